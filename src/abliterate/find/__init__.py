"""Finding the direction: prompt sets -> activations -> difference-of-means candidates -> the selected direction."""
