"""Model families: image classifiers (mlp, cnn, vit), causal language models (GPT-2,
SmolLM2 from its GGUF file) and their tokenizers."""
