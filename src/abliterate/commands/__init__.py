"""One module per command family: its options (from config.py), its numbered flow, its printout.
`steps` holds the steps several commands share; `options` builds argparse options from config.py."""
