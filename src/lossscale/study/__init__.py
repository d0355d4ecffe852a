"""Case studies: a CNN, an RNN, a Transformer and a deep MLP trained under every precision and scaling strategy.

A subpackage imported on demand (``import lossscale.study``), since its data need the ``study`` extra
(scikit-learn, num2words, sacrebleu). The command ``lossscale study`` drives it; see docs/study.md.

- :mod:`~lossscale.study.data`: the data sets (generated or shipped with a package) and loaders for the
  standard on-disk formats (CIFAR-10 python batches, MNIST IDX files, parallel text, CSV tables);
- :mod:`~lossscale.study.models`: ResNet, LSTM classifier, encoder-decoder Transformer, deep plain MLP;
- :mod:`~lossscale.study.tasks`: the four tasks, their recipes and budgets, :func:`example`;
- :mod:`~lossscale.study.configs`: ``PRECISION:VARIANT`` configuration names;
- :mod:`~lossscale.study.runner`: one run, many runs (workers, resume);
- :mod:`~lossscale.study.schema`: results.json, its JSON Schema and validator, atomic reading and writing;
- :mod:`~lossscale.study.analysis`: the seeds combined per configuration, and the findings of the report;
- :mod:`~lossscale.study.report`: report.md/report.html (tables, and the figures of :mod:`lossscale.plots`);
- :mod:`~lossscale.study.session`: a study's lifecycle in its output folder (start, resume, merge, sweeps);
- :mod:`~lossscale.study.lm`: the language-model tasks' text (the standard library's docstrings), GPT-style
  decoder and LSTM language model;
- :mod:`~lossscale.study.ledger`: the claims ledger (each claim of the article, its measurement, a verdict);
- :mod:`~lossscale.study.targets`: steps to target and loss at fractions of the budget;
- :mod:`~lossscale.study.sweeps`: ``--sweep seq-len / batch / label-noise``.
"""

from __future__ import annotations

from .configs import CONFIG_NAMES, QUICK_CONFIG_NAMES, StudyConfig, parse_configs
from .analysis import findings, summarise
from .report import write_report
from .schema import RESULTS_SCHEMA, SCHEMA_VERSION, SchemaError, load_results, validate, write_results
from .runner import RunSpec, plan_runs, run_one, run_study
from .tasks import TASK_NAMES, TASKS, build, example

__all__ = [
    "StudyConfig",
    "CONFIG_NAMES",
    "QUICK_CONFIG_NAMES",
    "parse_configs",
    "TASKS",
    "TASK_NAMES",
    "build",
    "example",
    "RunSpec",
    "plan_runs",
    "run_one",
    "run_study",
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "SchemaError",
    "validate",
    "load_results",
    "write_results",
    "summarise",
    "findings",
    "write_report",
]
