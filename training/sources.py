"""Where a training run's events come from: the log file its config names, or the synthetic generator.

Its own module because both sources sit below it: `synthetic.py` builds on `data.Interactions`, and `data.py`
must not import the generator back.
"""

from __future__ import annotations

from seqrank.training.config import DataConfig
from seqrank.training.data import SequenceData, SplitProtocol, build_sequences, load_interactions
from seqrank.training.synthetic import generate_log


def load_sequences(config: DataConfig) -> SequenceData:
    """The data a training run uses: the file in `config.path`, or the synthetic log when it is empty."""
    if config.path:
        interactions = load_interactions(config.path, config.format)
    else:
        interactions = generate_log(config.synthetic_users, config.synthetic_items, config.synthetic_seed)
    protocol = SplitProtocol(config.protocol, config.valid_cutoff, config.test_cutoff, config.target_behavior)
    return build_sequences(interactions, kcore=config.kcore, max_events_per_user=config.max_events_per_user,
                           attributes_path=config.attributes, protocol=protocol)
