"""Strategy options are data in testbed.core.options; every strategy has its entry, and no entry
lacks a strategy."""
from testbed.core.options import STRATEGY_OPTIONS
from testbed.server.strategies import STRATEGIES


def test_every_strategy_has_its_options_and_no_more():
    assert set(STRATEGY_OPTIONS) == set(STRATEGIES)
