"""The bundled tiny model (weights, tokenizer, card) and the script that trained it (train.py)."""
