"""rpcresults.states: names, the precedence order and the state sets.

The expected order is written out by hand from the spec; the sets are compared
with the installed Celery's ``celery.states`` (an independent oracle).
"""
from __future__ import annotations

import itertools

import pytest
from celery import states as celery_states

from rpcresults import states

#: Strongest first, exactly as the spec lists it; ``PROGRESS`` stands for every custom state.
EXPECTED_ORDER = ['SUCCESS', 'FAILURE', 'PROGRESS', 'REVOKED', 'STARTED', 'RECEIVED', 'REJECTED',
                  'RETRY', 'PENDING']

ORDERED_PAIRS = list(itertools.combinations(EXPECTED_ORDER, 2))  # (stronger, weaker)


def test_state_names_are_their_own_strings() -> None:
    assert states.PENDING == 'PENDING'
    assert states.RECEIVED == 'RECEIVED'
    assert states.STARTED == 'STARTED'
    assert states.SUCCESS == 'SUCCESS'
    assert states.FAILURE == 'FAILURE'
    assert states.REVOKED == 'REVOKED'
    assert states.REJECTED == 'REJECTED'
    assert states.RETRY == 'RETRY'
    assert states.IGNORED == 'IGNORED'


@pytest.mark.parametrize('name', ['PENDING', 'RECEIVED', 'STARTED', 'SUCCESS', 'FAILURE', 'REVOKED',
                                  'REJECTED', 'RETRY', 'IGNORED'])
def test_state_names_match_celery(name: str) -> None:
    assert getattr(states, name) == getattr(celery_states, name)


def test_precedence_ranks_strictly_increase_along_the_expected_order() -> None:
    ranks = [states.precedence(name) for name in EXPECTED_ORDER]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)


def test_sorting_by_precedence_gives_the_expected_order() -> None:
    shuffled = list(reversed(EXPECTED_ORDER))
    shuffled[2], shuffled[5] = shuffled[5], shuffled[2]
    assert sorted(shuffled, key=states.precedence) == EXPECTED_ORDER


@pytest.mark.parametrize('custom', ['PROGRESS', 'CUSTOM', 'UPLOADING', '', None])
def test_every_custom_state_ranks_between_failure_and_revoked(custom) -> None:
    assert states.precedence('FAILURE') < states.precedence(custom) < states.precedence('REVOKED')


def test_custom_states_share_one_rank() -> None:
    assert states.precedence('PROGRESS') == states.precedence('ANOTHER') == states.precedence(None)


@pytest.mark.parametrize('name', EXPECTED_ORDER + ['OTHER_CUSTOM'])
def test_precedence_agrees_with_celery(name: str) -> None:
    assert states.precedence(name) == celery_states.precedence(name)


@pytest.mark.parametrize('stronger,weaker', ORDERED_PAIRS)
def test_state_type_comparisons_follow_precedence(stronger: str, weaker: str) -> None:
    s, w = states.state(stronger), states.state(weaker)
    assert s > w
    assert s >= w
    assert not s < w
    assert not s <= w
    assert w < s
    assert w <= s
    assert not w > s
    assert not w >= s


@pytest.mark.parametrize('stronger,weaker', ORDERED_PAIRS)
def test_state_compares_against_plain_strings(stronger: str, weaker: str) -> None:
    assert states.state(stronger) > weaker
    assert states.state(weaker) < stronger


@pytest.mark.parametrize('stronger,weaker', ORDERED_PAIRS)
def test_state_comparisons_agree_with_celery(stronger: str, weaker: str) -> None:
    ours = (states.state(stronger) > states.state(weaker), states.state(weaker) > states.state(stronger))
    theirs = (celery_states.state(stronger) > celery_states.state(weaker),
              celery_states.state(weaker) > celery_states.state(stronger))
    assert ours == theirs == (True, False)


def test_success_beats_everything_and_pending_loses_to_everything() -> None:
    for name in EXPECTED_ORDER[1:]:
        assert states.state('SUCCESS') > states.state(name)
    for name in EXPECTED_ORDER[:-1]:
        assert states.state('PENDING') < states.state(name)


def test_two_custom_states_are_neither_greater_nor_less() -> None:
    a, b = states.state('PROGRESS'), states.state('UPLOADING')
    assert not a > b
    assert not a < b
    assert a >= b
    assert a <= b


def test_state_equal_to_itself_and_not_greater() -> None:
    for name in EXPECTED_ORDER:
        s = states.state(name)
        assert s == name
        assert not s > states.state(name)
        assert s >= states.state(name)
        assert s <= states.state(name)


def test_state_is_a_str_and_hashes_like_one() -> None:
    s = states.state('SUCCESS')
    assert isinstance(s, str)
    assert hash(s) == hash('SUCCESS')
    assert {s: 1}['SUCCESS'] == 1
    assert 'SUCCESS' in {s}


def test_max_of_states_is_the_strongest() -> None:
    assert max(states.state(n) for n in ['PENDING', 'STARTED', 'PROGRESS', 'RETRY']) == 'PROGRESS'
    assert max(states.state(n) for n in ['PENDING', 'STARTED', 'FAILURE', 'REVOKED']) == 'FAILURE'


def test_ready_states_match_celery() -> None:
    assert set(states.READY_STATES) == set(celery_states.READY_STATES) == {'SUCCESS', 'FAILURE', 'REVOKED'}


def test_unready_states_match_celery() -> None:
    assert set(states.UNREADY_STATES) == set(celery_states.UNREADY_STATES)
    assert set(states.UNREADY_STATES) == {'PENDING', 'RECEIVED', 'STARTED', 'REJECTED', 'RETRY'}


def test_exception_states_match_celery() -> None:
    assert set(states.EXCEPTION_STATES) == set(celery_states.EXCEPTION_STATES) == {'RETRY', 'FAILURE', 'REVOKED'}


def test_propagate_states_match_celery() -> None:
    assert set(states.PROPAGATE_STATES) == set(celery_states.PROPAGATE_STATES) == {'FAILURE', 'REVOKED'}


def test_all_states_match_celery() -> None:
    assert set(states.ALL_STATES) == set(celery_states.ALL_STATES)


def test_ready_and_unready_are_disjoint() -> None:
    assert not set(states.READY_STATES) & set(states.UNREADY_STATES)
    assert 'IGNORED' not in states.READY_STATES
    assert 'IGNORED' not in states.UNREADY_STATES


def test_state_sets_are_immutable() -> None:
    for name in ('READY_STATES', 'UNREADY_STATES', 'EXCEPTION_STATES', 'PROPAGATE_STATES'):
        value = getattr(states, name)
        assert isinstance(value, frozenset)
        with pytest.raises(AttributeError):
            value.add('X')  # type: ignore[attr-defined]


def test_public_names_exported() -> None:
    for name in ('PENDING', 'RECEIVED', 'STARTED', 'SUCCESS', 'FAILURE', 'REVOKED', 'REJECTED', 'RETRY',
                 'IGNORED', 'READY_STATES', 'UNREADY_STATES', 'EXCEPTION_STATES', 'PROPAGATE_STATES',
                 'precedence', 'state'):
        assert name in states.__all__
        assert hasattr(states, name)
