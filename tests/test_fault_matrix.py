"""docs/reliability.md lists every fault test, each passed when it was generated."""

from tests.fault_matrix import check, fault_tests


def test_fault_tests_are_found():
    assert len(fault_tests()) >= 10


def test_reliability_doc_matches_the_fault_tests():
    assert check() == [], "regenerate with: .venv/bin/python -m tests.fault_matrix"
