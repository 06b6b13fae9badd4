"""cpt: continued masked-LM pretraining of Chinese BERT-family models, as one batch job."""

__version__ = "0.1.0"
