"""Writing results where people run models: file names, the output check and atomic writes (files), a Hugging
Face directory (hf), GGUF (gguf_copy, gguf_convert, ggml), llama.cpp companions (llamacpp), PEFT (peft), and
a run's whole set of files (outputs)."""
