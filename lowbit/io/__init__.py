"""The I/O layer: model directories on disk (atomic writes, safetensors shards), the
lowbit checkpoint schema, GPTQ interoperability, `checkpoint_info`, the transformers
quantizer, and the default model and texts (`assets`).

Nothing is imported here: transformers takes seconds to import, and
`lowbit.io.hf_hook` must stay cheap for `import lowbit`.
"""
