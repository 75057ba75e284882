"""Checkpoint formats (Hugging Face, Mistral consolidated) and the streaming loader.

- ``loader``: ``resolve(name)`` -> ``ModelSource``; ``load_model(name, device, dtype)`` -> model;
- ``writer``: ``save_checkpoint``, ``convert_checkpoint``, ``write_checkpoint`` (any source, either format);
- ``reader``: a checkpoint folder validated from its headers, then read tensor by tensor;
- ``hf`` / ``consolidated``: each format's tensor names (``specs``) and files; ``specs``: the shared pieces;
- ``safetensors_io``: header parsing and the streaming safetensors writer; ``hub``: Hub repo ids;
- ``tokenizer_files``: which mistral-common tokenizer file a folder ships; ``errors``: ``CheckpointError``.
"""
