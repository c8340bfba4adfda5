"""Measuring an edit: refusal markers and scores, KL, the greedy decoder, evaluation, steering behaviour,
layer geometry, and the same evaluation inside llama.cpp."""
