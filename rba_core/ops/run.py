"""One request resolved once at the edge: :class:`Run`.

The CLI makes a run from its arguments, the dashboard from its sidebar, the library from keyword arguments
(:meth:`Run.of`); the operations (``analyze``, ``approximate``, ``export``, ``search``, ``table``) are functions
of a run and of what they are asked. A run resolves the model's name once (:class:`rba_core.models.ModelRef`:
family, blocks, fingerprint, nothing loaded), loads it at most once and only when a pass must run
(:class:`LazyEncoder`), and reads the data as the model does (a causal LM reads a language-model text as
windows of its own tokens, :func:`lm_dataset`). The passes below are handed the resolved reference, so no
stage resolves the name again.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rba_core.cache import Cache
from rba_core.errors import RBAError, refuse_unknown
from rba_core.data.lm_data import DEFAULT_SEQ_LEN, LMText, is_lm_text
from rba_core.models import (DEFAULT_MAX_LENGTH, Encoder, ModelRef, adapter_class, load_config, load_encoder,
                             model_ref, readable_source)
from rba_core.models.decoder import DecoderLM
from rba_core.progress import Progress
from rba_core.data import open_sample
from rba_core.registry import lm_text_mismatch, stream_spec

Stage = Callable[[str], None]


class LazyEncoder:
    """Loads the model only when a forward pass is really needed (never on a full cache hit)."""

    def __init__(self, model, encoder: Encoder | Callable[[], Encoder] | None = None,
                 max_length: int | None = DEFAULT_MAX_LENGTH):
        # A zero-arg loader lets the app share its model cache; a loaded model is used as it is.
        self.model, self.encoder, self.max_length = model, encoder, max_length
        if encoder is None and not isinstance(model, (str, ModelRef)):
            self.encoder = model_ref(model, max_length).loaded
        elif encoder is None and isinstance(model, ModelRef):
            self.encoder = model.loaded

    def __call__(self) -> Encoder:
        if self.encoder is None:
            self.encoder = load_encoder(self.model, max_length=self.max_length)
        elif not isinstance(self.encoder, Encoder):
            self.encoder = self.encoder()
        return self.encoder.with_max_length(self.max_length)


def lm_dataset(model, dataset, seq_len: int = DEFAULT_SEQ_LEN, ref: ModelRef | None = None):
    """For a causal LM and a language-model text source (hub alias, ``.txt`` file, folder of texts),
    the source as windows of ``seq_len`` of the model's tokens; any other pair is returned unchanged."""
    if not is_lm_text(dataset):
        return dataset
    ref = ref or model_ref(model)
    if not issubclass(adapter_class(ref.info.family), DecoderLM):
        raise RBAError(lm_text_mismatch(ref.name, ref.info.modality, dataset))
    if ref.loaded is not None:
        source, config = ref.loaded.source, ref.loaded.config
    else:
        config = load_config(ref.name)
        source = readable_source(ref.name)  # a GGUF file: its plain checkpoint, which holds the tokenizer
    return LMText(dataset, source, seq_len, getattr(config, "max_position_embeddings", None))


@dataclass
class Run:
    """A request resolved once: the model and the data, the sample plan, and where the work goes.

    ``model``: an alias, hub id, folder, GGUF file or a loaded model; ``dataset``: an alias, folder, list of
    samples or language-model text; ``fit_n`` train samples fit maps (and are analysed), ``eval_n`` test samples
    evaluate, drawn with ``seed``; ``max_length`` truncates texts, ``seq_len`` cuts a language-model text into
    windows; ``encoder``: a loaded encoder of ``model``, a zero-argument loader (called only on a cache miss) or
    a :class:`LazyEncoder` shared between runs. ``ref``, ``lazy`` and ``data`` are resolved from these."""

    model: Any
    dataset: Any
    fit_n: int = 0
    eval_n: int = 0
    seed: int = 0
    max_length: int | None = DEFAULT_MAX_LENGTH
    seq_len: int = DEFAULT_SEQ_LEN
    cache: Cache | None = None
    progress: Progress | None = None
    on_stage: Stage | None = None
    encoder: Any = None
    ref: ModelRef = field(init=False)
    lazy: LazyEncoder = field(init=False)
    data: Any = field(init=False)  # the dataset as the passes read it

    def __post_init__(self):
        self.cache = self.cache or Cache()
        # A shared LazyEncoder lets many calls (table rows, search probes) load the model at most once.
        self.lazy = self.encoder if isinstance(self.encoder, LazyEncoder) else \
            LazyEncoder(self.model, self.encoder, self.max_length)
        # A name is resolved by name (its cache keys do not depend on whether a loaded copy came with it).
        loaded = self.lazy.encoder if isinstance(self.lazy.encoder, Encoder) else None
        self.ref = model_ref(self.model if isinstance(self.model, (str, ModelRef)) else loaded or self.model,
                             self.max_length)
        self.data = lm_dataset(self.model, self.dataset, self.seq_len, self.ref)

    @classmethod
    def of(cls, model, dataset, options: dict, asked: Sequence[str] = ()) -> tuple["Run", dict]:
        """The run of library keyword arguments, and the keywords that are the operation's own (``asked``);
        any other keyword is a :class:`TypeError`, as Python would say."""
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        refuse_unknown(options, fields, asked)
        run = cls(model, dataset, **{k: v for k, v in options.items() if k in fields})
        return run, {k: v for k, v in options.items() if k in asked}

    def on(self, dataset) -> "Run":
        """The same request on another dataset (the model stays resolved, and loaded at most once)."""
        other = copy.copy(self)
        other.dataset, other.data = dataset, lm_dataset(self.model, dataset, self.seq_len, self.ref)
        return other

    def quiet(self) -> "Run":
        """The same request without stage messages (for the many small steps of a table or a search's probes)."""
        other = copy.copy(self)
        other.on_stage = None
        return other

    @property
    def info(self):
        return self.ref.info

    def stage(self, text: str) -> None:
        if self.on_stage:
            self.on_stage(text)

    def samples(self, split: str) -> int:
        """How many samples of ``split`` the run draws: ``fit_n`` of train, ``eval_n`` of test."""
        return self.fit_n if split == "train" else self.eval_n

    def check_samples(self, *splits: str) -> None:
        """One sentence now, before any pass, when a split holds fewer samples than the run draws from it (opening a
        split reads its labels, not its samples; a stream is checked as it is read)."""
        if stream_spec(self.data):
            return
        for split in splits:
            if self.samples(split):
                open_sample(self.data, split, self.samples(split), self.seed)

    def extract(self, split: str, **options):
        """The pass over this run's samples of ``split`` (:func:`rba_core.passes.extract.extract`)."""
        from rba_core.passes.extract import extract

        return extract(self.ref, self.data, self.samples(split), self.seed, split, max_length=self.max_length,
                       cache=self.cache, progress=self.progress, encoder=self.lazy, **options)
