"""The Multiverse text format and everything derived from it alone (SPEC sections 1, 3).

  - :mod:`.grammar`: the 12 tags, strict parser/validator, tolerant reader, serialize, flatten.
  - :mod:`.layout`: the one layout rule (positions, masks) shared by trainer and engine; its
    token-by-token state, :mod:`.layout_state`, needs no torch.
  - :mod:`.approx`: the built-in approximate tokenizer's counts, linear and in bounded memory.
  - :mod:`.prompts`: the SPEC 1.3 prompt rendering, answer prefix and stop ids.
  - :mod:`.tokenizer`: the tags in a tokenizer/model, and the one ``load_tokenizer``.

Imports only the standard library and torch at module level (Hugging Face libraries lazily,
inside the functions that need them).
"""
