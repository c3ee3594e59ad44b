"""Data: rows in the common instruction formats (examples.py), their tokenization with response-only labels
(tokenize.py), the memory-mapped tokenized-data cache (cache.py), prompt sets (prompts.py) and the built-in
sets (builtin/)."""
from fastprocon.data.examples import (
                                      IGNORE_INDEX,
                                      Example,
                                      builtin_path,
                                      load_examples,
                                      load_instructions,
                                      resolve_data_path,
)
from fastprocon.data.tokenize import TokenizedExample, collate, format_prompt, tokenize_examples

__all__ = ["IGNORE_INDEX", "Example", "TokenizedExample", "builtin_path", "load_examples", "load_instructions",
           "resolve_data_path", "format_prompt", "tokenize_examples", "collate"]
