"""Small experiments that exercise semitriton on trained models (e.g. the synthetic
FirstTokenRepeatedOnce task of Du et al., ACL 2023, in :mod:`semitriton.experiments.first_token`)."""
