"""llama.cpp's GGUF format, read and written in one package.

* :mod:`engine.gguf.reader` — a GGUF model file into a transformers config and a Hugging Face state dict.
* :mod:`engine.gguf.writer` — a model (LoRA merged) into GGUF files, with llama.cpp's tensor-type rules.
* :mod:`engine.gguf.quants` — our own encoders for the K-quant and legacy block types.
* :mod:`engine.gguf.lora` — a LoRA adapter as a llama.cpp LoRA GGUF.
* :mod:`engine.gguf.modelfile` — the Ollama ``Modelfile`` beside an exported file.

What depends on the model family (architecture name, Q/K permutation, the HF <-> llama.cpp tensor-name
map, which metadata a family records) comes from :mod:`engine.models.families`; this package holds no
family table of its own.
"""
