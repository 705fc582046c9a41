"""Decoder language models through the adapter door, checked against the models' own forward.

Each family gets a tiny random causal LM (hidden 32, 4 blocks, seeded) built here and saved with
``save_pretrained`` next to a byte-level tokenizer built offline (256 byte tokens, no merges, an
end-of-text token that doubles as padding), then loaded through :func:`rba_core.models.load_encoder`.
Checks: hand-run blocks equal the model's own ``output_hidden_states`` and logits on real tokens
with left and right padding; the identity map equals the model with layers deleted from its own
module list (``num_hidden_layers`` and ``layer_types`` cut); statistics do not see padding.

transformers ties a decoder's last ``hidden_states`` entry to the final norm's output, so the
model's own ``hs[L]`` is compared with the core's ``final_norm(hs[L])``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_core.passes.approx import ApproximatedEncoder, approximate_encoder
from rba_core.passes.extract import token_rows
from rba_core.models import load_encoder, model_info
from rba_core.measures.stats import StatsAccumulator

BLOCKS, WIDTH, VOCAB = 4, 32, 260
SIZES = dict(hidden_size=WIDTH, num_hidden_layers=BLOCKS, num_attention_heads=4, intermediate_size=64,
             vocab_size=VOCAB, max_position_embeddings=128)
#: every family the registry runs as a decoder; the slower checks use the first four
FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "mistral", "qwen3", "phi3", "gemma3_text", "gpt_neox")
CORE = FAMILIES[:4]
TEXTS = ["the data file is not a tool", "a", "python library for the mail server of this small system",
         "it is an image viewer"]


def tiny_config(family: str):
    """A 4-block random config of ``family``; sliding windows of 3 tokens where the family has them."""
    import transformers as tf

    kv = dict(num_key_value_heads=2)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=WIDTH, n_layer=BLOCKS, n_head=4, vocab_size=VOCAB, n_positions=128)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**SIZES)
    if family == "qwen2":  # blocks 3 and 4 use a sliding window
        return tf.Qwen2Config(**SIZES, **kv, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    if family in ("gemma2", "gemma3_text"):
        cls = tf.Gemma2Config if family == "gemma2" else tf.Gemma3TextConfig
        return cls(**SIZES, **kv, head_dim=8, sliding_window=3)
    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config}
    extra = {"mistral": dict(sliding_window=3), "qwen3": dict(head_dim=8), "phi3": dict(pad_token_id=0)}
    return classes[family](**SIZES, **kv, **extra.get(family, {}))


def byte_tokenizer(padding_side: str = "right"):
    """Byte-level BPE with no merges: one token per byte, ids 0..255, end-of-text 256 (no pad token:
    the adapter pads with end-of-text, as for real decoders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", padding_side=padding_side)


def save_decoder(folder: Path, family: str, padding_side: str = "right", seed: int = 0) -> Path:
    """A tiny random causal LM of ``family`` and its tokenizer, saved as save_pretrained writes them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():  # random norm scales, as trained models have (fresh ones are all 1)
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    byte_tokenizer(padding_side).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """``get(family, side)``: the folder of a saved tiny decoder (built once per family and side)."""
    root, made = tmp_path_factory.mktemp("decoders"), {}

    def get(family: str, side: str = "right") -> str:
        if (family, side) not in made:
            made[family, side] = str(save_decoder(root / f"{family}-{side}", family, side))
        return made[family, side]

    return get


def own_forward(folder: str, inputs, positions, model=None):
    """The model's own forward, given the same token ids, mask and positions."""
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs, position_ids=positions, output_hidden_states=True, use_cache=False)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hand_run_blocks_equal_the_models_own_forward(family, side, decoders):
    enc = load_encoder(decoders(family, side), device="cpu")
    info = model_info(decoders(family, side))
    assert (info.modality, info.pooling, info.num_blocks) == ("text", "last", BLOCKS)
    inputs = enc.preprocess(TEXTS)
    mask = inputs["attention_mask"].bool()
    padded_first = bool((~mask[:, 0]).any())
    assert padded_first == (side == "left") and not mask.all(), "the batch must be padded on the tokenizer's side"
    with torch.no_grad():
        hs, _ = enc.hidden_states(inputs)
        logits = enc.logits(hs[-1])
    theirs = own_forward(decoders(family, side), inputs, enc.position_ids(inputs))
    ours = hs[:-1] + [enc.final_norm(hs[-1])]
    assert len(theirs.hidden_states) == BLOCKS + 1
    for k, (a, b) in enumerate(zip(ours, theirs.hidden_states)):
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5, msg=lambda m: f"hs[{k}]: {m}")
    torch.testing.assert_close(logits[mask], theirs.logits[mask], rtol=1e-5, atol=1e-5)
    # The final representation is the last real token of final_norm(hs[L]).
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    torch.testing.assert_close(enc.final(hs[-1], mask), theirs.hidden_states[-1][torch.arange(len(TEXTS)), last])


def _delete_layers(model, ranges):
    """A copy of the causal LM with layers i+1..j removed from its own module list, config cut to match."""
    pruned = copy.deepcopy(model)
    base = pruned.base_model
    layers = base.h if hasattr(base, "h") else base.layers
    kinds = list(getattr(pruned.config, "layer_types", None) or [])
    for i, j in sorted(ranges, reverse=True):
        del layers[i:j]
        del kinds[i:j]
    pruned.config.num_hidden_layers = len(layers)
    if kinds:
        pruned.config.layer_types = kinds
    return pruned


@pytest.mark.parametrize("ranges", [[(1, 3)], [(0, 1), (2, 4)]], ids=["1-3", "0-1+2-4"])
@pytest.mark.parametrize("family", CORE)
def test_identity_map_equals_deleting_layers(family, ranges, decoders):
    from transformers import AutoModelForCausalLM

    folder = decoders(family, "left")
    enc = load_encoder(folder, device="cpu")
    inputs = enc.preprocess(TEXTS)
    mask = inputs["attention_mask"].bool()
    skipped = approximate_encoder(enc, None, ranges, kind="identity")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = own_forward(folder, inputs, enc.position_ids(inputs), _delete_layers(model, ranges))
    with torch.no_grad():
        last = skipped.last_hidden(**inputs)
        torch.testing.assert_close(enc.logits(last)[mask], theirs.logits[mask], rtol=1e-5, atol=1e-5)
        same = ApproximatedEncoder(enc, ranges, [None] * len(ranges))(**inputs)
    torch.testing.assert_close(skipped(**inputs), same, rtol=0, atol=0)
    assert enc.num_blocks == BLOCKS and model.config.num_hidden_layers == BLOCKS  # nothing shared was cut


def _stats(enc, texts):
    inputs = enc.preprocess(texts)
    with torch.no_grad():
        hs, _ = enc.hidden_states(inputs)
    mask = enc.token_mask(inputs)
    acc = StatsAccumulator(enc.num_blocks + 1, enc.hidden_size, "cpu")
    acc.add(hs, token_rows(np.arange(len(texts)), mask, hs[0].shape[1], 1.0))
    return acc.result(), enc.final(hs[-1], mask).numpy()


@pytest.mark.parametrize("family", CORE)
def test_padding_side_and_length_do_not_change_the_statistics(family, decoders):
    """Left padding, right padding and no padding (one text at a time) give the same sums."""
    results = {side: _stats(load_encoder(decoders(family, side), device="cpu"), TEXTS) for side in ("left", "right")}
    enc = load_encoder(decoders(family, "right"), device="cpu")
    alone = [_stats(enc, [text]) for text in TEXTS]
    count = sum(stats.count for stats, _ in alone)
    singles = [sum(stats.upper[a] for stats, _ in alone) for a in range(BLOCKS + 1)]
    finals = np.concatenate([final for _, final in alone])
    for side, (stats, final) in results.items():
        assert stats.count == count
        for a in range(BLOCKS + 1):
            np.testing.assert_allclose(stats.upper[a], singles[a], rtol=1e-5, atol=1e-4, err_msg=side)
        np.testing.assert_allclose(final, finals, rtol=1e-5, atol=1e-5, err_msg=side)


# --- language-model text, perplexity and the LM scores of analyze / approximate ------------------

SEQ = 16
WORDS = "the a of to and in is it for on with data file tool server library package game sound mail".split()


def _prose(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=words)) + "\n"


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """train.txt and test.txt of random words (byte tokens: about 5 per word)."""
    folder = tmp_path_factory.mktemp("lm-text")
    (folder / "train.txt").write_text(_prose(0, 300))
    (folder / "test.txt").write_text(_prose(1, 120))
    return folder


def test_text_is_one_stream_cut_into_windows(tmp_path):
    import json

    from rba_core.errors import RBAError
    from rba_core.data.lm_data import split_text, token_windows

    tok = byte_tokenizer()
    windows = token_windows(tok, "abcdefghij" * 5, SEQ)  # 50 tokens: 3 windows, 2 tokens dropped
    assert windows.shape == (3, SEQ) and windows.dtype == np.int64
    assert tok.decode(windows.flatten().tolist()) == ("abcdefghij" * 5)[:48]
    rows = ["first row", "second row"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), tmp_path / "test.parquet")
    for split in ("train", "test"):
        assert split_text(str(tmp_path), split) == "first row\n\nsecond row"
    with pytest.raises(RBAError, match=r"fewer than one window of 16; add text or lower --seq-len\.$"):
        token_windows(tok, "too short", SEQ, "The test split")
    with pytest.raises(RBAError, match=r"cannot be loaded from the hub .*wikitext2/train\.txt"):
        split_text("WikiText-2", "train")


def test_perplexity_equals_the_models_own_labels_loss(decoders, text_folder):
    """Original and skipped models against transformers' own ``labels=`` loss on the same windows."""
    from transformers import AutoModelForCausalLM

    from rba_core.data import open_dataset
    from rba_core.data.lm_data import LMText
    from rba_core.passes.perplexity import lm_scores

    folder = decoders("llama")
    enc = load_encoder(folder, device="cpu")
    windows = open_dataset(LMText(str(text_folder), folder, SEQ), "test").items(range(5))
    ranges = [(1, 3)]
    scores = lm_scores(enc, {"skip": approximate_encoder(enc, None, ranges, "identity")}, windows, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.as_tensor(np.stack(windows))
    with torch.no_grad():
        for name, net in (("original", model), ("skip", _delete_layers(model, ranges))):
            expected = float(torch.exp(net(input_ids=ids, labels=ids, use_cache=False).loss))
            assert scores["perplexity"][name] == pytest.approx(expected, rel=1e-5), name
        own_top = model(input_ids=ids).logits[:, :-1].argmax(-1)
        skip_top = _delete_layers(model, ranges)(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
    assert scores["top1_agreement"]["original"] == 1.0
    assert scores["top1_agreement"]["skip"] == pytest.approx(float((own_top == skip_top).float().mean()))


def test_cli_analyze_and_approximate_a_causal_lm(decoders, text_folder, tmp_path, capsys):
    import json

    from rba_core.cli import main
    from rba_core.measures.metrics import angular_distance, block_influence

    folder = decoders("gpt2")
    common = ["--model", folder, "--dataset", str(text_folder), "--seq-len", str(SEQ), "--cache-dir", str(tmp_path)]
    assert main(["analyze", *common, "--n", "6", "--window", "1", "--window", "2", "--json", str(tmp_path / "a.json")]) == 0
    analysis = json.loads((tmp_path / "a.json").read_text())
    assert re.search(r"96/96 \[[0-9:]+<[0-9:]+, +[0-9.]+k? ?tokens/s\]", capsys.readouterr().err)  # 6 windows of 16
    assert len(analysis["block_influence"]) == BLOCKS and analysis["stats"]["kind"] == "all-pairs"
    assert [len(analysis["angular_distance"][n]) for n in ("1", "2")] == [BLOCKS, BLOCKS - 1]
    # The same scores by hand from the model's own hidden states on the sampled windows.
    from rba_core.data import open_dataset, sample_indices
    from rba_core.data.lm_data import LMText

    source = open_dataset(LMText(str(text_folder), folder, SEQ), "train")
    ids = torch.as_tensor(np.stack(source.items(sample_indices(len(source), 6, 0))))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        enc = load_encoder(folder, device="cpu")
        states = list(hs[:-1]) + [enc.hidden_states({"input_ids": ids})[0][-1]]  # own hs[L] is after the norm
    tokens = torch.stack([h.reshape(-1, WIDTH) for h in states]).numpy()
    np.testing.assert_allclose(analysis["block_influence"], block_influence(tokens), rtol=1e-4, atol=1e-6)
    last = torch.stack([h[:, -1] for h in states]).numpy()
    np.testing.assert_allclose(analysis["angular_distance"]["2"], angular_distance(last, 2), rtol=1e-4, atol=1e-6)

    # Windows of 2 instead of all pairs: the same scores, statistics said to be windows and smaller.
    assert main(["analyze", *common, "--n", "6", "--stats-window", "2", "--json", str(tmp_path / "w.json")]) == 0
    windowed = json.loads((tmp_path / "w.json").read_text())
    assert windowed["stats"]["kind"] == "windows" and windowed["stats"]["bytes"] < analysis["stats"]["bytes"]
    np.testing.assert_allclose(windowed["block_influence"], analysis["block_influence"], rtol=1e-6)
    assert windowed["fit_residual"][1][3] == pytest.approx(analysis["fit_residual"][1][3], rel=1e-6)
    assert windowed["fit_residual"][1][2] is None
    fresh = ["--cache-dir", str(tmp_path / "fresh")]  # a cache hit runs no pass and needs no memory
    assert main(["analyze", *common, *fresh, "--n", "6", "--stats-budget-gb", "1e-6"]) == 2  # one sentence

    assert main(["approximate", *common, "--fit-n", "8", "--eval-n", "4", "--range", "1", "3",
                 "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    for key in ("perplexity", "top1_agreement"):
        assert set(result[key]) == {"original", "approximated", "skip"}
    assert result["top1_agreement"]["original"] == 1.0 and result["perplexity"]["original"] > 1
    # The fit keeps only the range's own float64 statistics, shared by every map kind of the range.
    assert main(["approximate", *common, *fresh, "--fit-n", "8", "--eval-n", "4", "--range", "1", "3",
                 "--map", "affine", "--no-latency", "--json", str(tmp_path / "c.json")]) == 0
    ranged = json.loads((tmp_path / "c.json").read_text())
    assert ranged["cache"]["fit"] == result["cache"]["fit"] and ranged["latency_ms_per_image"] is None
    assert ranged["conditioning"][0]["range"] == [1, 3] and ranged["perplexity"]["skip"] == result["perplexity"]["skip"]


def test_the_demo_lm_reproduces_its_recorded_held_out_perplexity():
    """The shipped demo GPT (rba_core/demo/train_lm.py) on the shipped demo-text, through the aliases."""
    import json

    from rba_core.data import open_dataset
    from rba_core.data.lm_data import LMText
    from rba_core.passes.perplexity import lm_scores
    from rba_core.registry import DEMO_LM_DIR, resolve_model

    record = json.loads((DEMO_LM_DIR / "training.json").read_text())
    enc = load_encoder("demo-GPT", device="cpu")
    assert enc.num_blocks == 8 and resolve_model("demo-GPT") == str(DEMO_LM_DIR)
    test = open_dataset(LMText("demo-text", str(DEMO_LM_DIR), record["seq_len"]), "test")
    assert len(test) == record["test_windows"]
    scores = lm_scores(enc, {}, test.items(range(len(test))), batch_size=64)
    assert scores["perplexity"]["original"] == pytest.approx(record["test_perplexity"], abs=1e-3)


def test_greedy_continuation_of_the_original_equals_generate():
    """continue_text's original model is the model's own greedy generate; skipping blocks changes it."""
    from rba_core.passes.approx import approximate_encoder
    from rba_core.models import load_encoder
    from rba_core.passes.perplexity import continue_text

    enc = load_encoder("demo-GPT", "cpu")
    ids = enc.processor("Package description: a", return_tensors="pt")["input_ids"]
    expected = enc.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    out = continue_text(enc, {"skip": approximate_encoder(enc, None, [(1, 7)], "identity")},
                        "Package description: a", tokens=12)
    assert out["original"] == enc.processor.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert out["skip"] != out["original"]


def test_bfloat16_pass_stays_close_to_float32_and_gets_its_own_cache_key(decoders, text_folder):
    """The CUDA precision (bfloat16 weights and activations, float32 statistics products summed in
    float64), run here on CPU: the pass, a fitted map and perplexity work on bfloat16 states and stay
    within bfloat16 rounding of the float32 results; the dtype is part of the extraction key."""
    from rba_core.data import open_dataset
    from rba_core.passes.extract import extraction_key, run_pass
    from rba_core.data.lm_data import LMText
    from rba_core.models.decoder import DecoderLM
    from rba_core.passes.perplexity import lm_scores
    from rba_core.measures.stats import StatsPlan, TokenStats

    folder = decoders("llama")
    enc = load_encoder(folder, device="cpu")
    half = type(enc)(enc.name, enc.source, enc.family, copy.deepcopy(enc.model).to(torch.bfloat16), enc.processor,
                     "cpu", enc.pooling, enc.max_length)
    assert DecoderLM.compute_dtype("cuda:0") == torch.bfloat16 and DecoderLM.compute_dtype("cpu") == torch.float32
    source = open_dataset(LMText(str(text_folder), folder, SEQ), "train")
    indices = np.arange(8)
    full, bf16 = (run_pass(e, source, indices, StatsPlan(), batch_size=8) for e in (enc, half))
    for group in ("reps", "stats"):
        for name, value in full[group].items():
            if name in ("fit_residual",):
                continue
            scale = np.abs(value).max() or 1.0
            np.testing.assert_allclose(bf16[group][name], value, rtol=0, atol=0.05 * scale, err_msg=name)
    stats = {name: TokenStats.from_arrays(run["stats"]) for name, run in (("full", full), ("bf16", bf16))}
    windows = source.items(indices)
    nets = {name: {"approximated": approximate_encoder(e, stats[name], [(1, 3)])} for name, e in
            (("full", enc), ("bf16", half))}
    scores = {name: lm_scores(e, nets[name], windows, batch_size=4) for name, e in (("full", enc), ("bf16", half))}
    for model in ("original", "approximated"):
        assert scores["bf16"]["perplexity"][model] == pytest.approx(scores["full"]["perplexity"][model], rel=0.05)
    keys = {dtype: extraction_key({"model": folder}, source, indices, StatsPlan(), 1.0, "last", None, dtype)
            for dtype in ("float32", "bfloat16")}
    assert keys["float32"] != keys["bfloat16"]
