"""Vocabulary constants that the data, the model, the artifact and the service agree on.

A leaf module: it imports nothing from the project, so any module may import it without a cycle.
"""

PAD_INDEX = 0  # internal item index 0 is padding everywhere; real items are 1..num_items
UNSPECIFIED_BEHAVIOR = ""  # the behaviour name of an event that carries none (the service maps it to the first type)
BEHAVIOR_ORDER = ("pv", "cart", "fav", "buy")  # known names come first in funnel order, others sorted after
# Verb for "because you <verb> <item>"; behaviour names not listed (and "") read as DEFAULT_VERB.
BEHAVIOR_VERBS = {"pv": "viewed", "cart": "added to cart", "fav": "saved", "buy": "bought"}
DEFAULT_VERB = "interacted with"


def behavior_verb(behavior: str) -> str:
    return BEHAVIOR_VERBS.get(behavior, DEFAULT_VERB)
