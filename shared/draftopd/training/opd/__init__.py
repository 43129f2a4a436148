"""Draft-OPD: rollouts, replay from the error positions, the two-stream loss, and the loop."""
