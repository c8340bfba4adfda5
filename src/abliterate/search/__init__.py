"""Searching the edit: the space of weighted ablations (space), cheap trial scores (probe), the Optuna study and
the choice (study), and the induction search for steering (induce)."""
