"""Text and tokens for verify, calibration and uptraining: one document reader
(documents.py) and the token streams built on it (tokens.py)."""

from .documents import DataSource, check_data, describe, iter_documents, read_documents, split_documents
from .tokens import TokenStream, blocks, build_stream, global_batches, token_stream

__all__ = [
    "DataSource",
    "TokenStream",
    "blocks",
    "build_stream",
    "check_data",
    "describe",
    "global_batches",
    "iter_documents",
    "read_documents",
    "split_documents",
    "token_stream",
]
