"""Covariance statistics (C0) for editors: sources, one-pass computation, corpora and the cache.

Editors read C0 only through a :class:`CovarianceSource` (``prepare(model, layers)`` then
``moment(model, layer)``); :class:`CachedCovariance` computes missing layers in one pass over a corpus
(:func:`collect_second_moments`) and caches them; :class:`FileCovariance` reads user-given files.
"""
from .cache import CachedCovariance, default_stats_dir, read_cache_file
from .cli_args import add_corpus_arguments, add_stats_arguments, source_from_args
from .collect import SecondMoments, collect_second_moments, distributed_info, init_distributed
from .corpus import Corpus, HFDatasetCorpus, JsonlCorpus, TextFileCorpus, TextListCorpus, open_corpus
from .source import CovarianceSource, FileCovariance, InMemoryCovariance, Moment, parse_cov_args, read_moment_file

__all__ = ["add_corpus_arguments", "add_stats_arguments", "source_from_args", "CachedCovariance", "Corpus",
           "CovarianceSource", "FileCovariance", "HFDatasetCorpus", "InMemoryCovariance", "JsonlCorpus", "Moment",
           "SecondMoments", "TextFileCorpus", "TextListCorpus", "collect_second_moments", "default_stats_dir",
           "distributed_info", "init_distributed", "open_corpus", "parse_cov_args", "read_cache_file",
           "read_moment_file"]
