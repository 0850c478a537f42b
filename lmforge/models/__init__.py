"""Model families: one readable file each (gpt.py, bert.py)."""
