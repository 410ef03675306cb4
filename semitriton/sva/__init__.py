"""Subject-verb agreement (SVA) evaluation: minimal pairs regenerated from the
templates of Marvin & Linzen (2018), "Targeted Syntactic Evaluation of Language
Models" (EMNLP 2018), and helpers to score and attribute them."""
