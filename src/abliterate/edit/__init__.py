"""Editing the residual stream: projecting a direction out (project), a weighted subspace ablation (weighted),
adding a direction (steer). Hooks for trying, in-place weight edits for saving."""
