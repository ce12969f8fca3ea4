"""unlearnflow's library: data, requests, models, training, Fisher statistics, unlearning
methods and evaluation. Tensors, arrays and Parquet in; tensors, arrays and metric dicts out.
No orchestration, tracking or versioning imports here (those live in tasks/ and flows/)."""

__version__ = "0.1.0"
