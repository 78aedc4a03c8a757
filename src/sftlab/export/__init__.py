"""What leaves sftlab for deployment: a checkpoint (or a rewound point) as an adapter, a merged folder or a GGUF
file, with a Modelfile for Ollama, a model card that states what was forgotten, and the upload to the Hub.

  gguf.py       merged HF model + tokenizer -> one GGUF file (llama.cpp's layout), f32/f16/bf16/q8_0
  modelfile.py  the chat template -> an Ollama Modelfile (FROM, TEMPLATE, stop parameters)
  card.py       the model card (README.md with hub front matter) and the frontier plot beside it
  write.py      `sftlab export`: choose the point (step, selection rule, alpha), write the folder atomically
  push.py       `sftlab push`: upload an export folder with huggingface_hub (or list it: --dry-run)
"""
