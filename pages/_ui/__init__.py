"""Shared Streamlit widgets for the dashboard pages (not a page: Streamlit lists only pages/*.py)."""
