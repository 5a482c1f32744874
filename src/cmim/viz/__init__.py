"""cmim.viz: pictures of what an encoder learned (t-SNE, patch similarity, CLS attention), training curves."""
