"""What a run hands over: Hugging Face model directories and their model cards.

export/
  final.py         final/ at the end of training (gathered on rank 0), and the hf/ directory (config,
                   tokenizer, probe logits) each full-weight checkpoint carries for verified.py
  verified.py      `mellama-train export CHECKPOINT OUT`: any ZeRO checkpoint -> sharded safetensors,
                   checked against the probe logits the training-time model computed
  model_card.py    README.md beside final/, adapter/ and exports: base, sources, licenses, tokens, steps
"""
