"""The stages of a labelling run, one module each."""
