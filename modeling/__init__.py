"""Model stages: backbone, pixel decoder, transformer decoder, heads, loss."""
