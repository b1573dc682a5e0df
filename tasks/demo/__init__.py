"""The demo world: a synthetic source with known truth, for the offline demo and the tests."""
