# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)
"""The modules against a stand-in guard that answers with documents of guard's schemas:
what each module returns, when it fails, changes or not, and the argv it gives guard."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile

import pytest


def collections_root():
    """The directory that holds ansible_collections/guard/guard (tests run from inside it)."""
    for start in (os.environ.get('PWD', ''), os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        path = start
        while path != os.path.dirname(path):
            if os.path.basename(path) == 'ansible_collections':
                return os.path.dirname(path)
            path = os.path.dirname(path)
    raise RuntimeError('run the tests from ansible_collections/guard/guard (as ansible-test does)')


COLLECTIONS = collections_root()

FAKE_GUARD = r'''#!%s
import json, os, sys
log = os.environ['FAKE_GUARD_LOG']
with open(log, 'a') as f:
    f.write(json.dumps(sys.argv[1:]) + '\n')
responses = json.load(open(os.environ['FAKE_GUARD_RESPONSES']))
words = [a for a in sys.argv[1:] if not a.startswith('-')]
key = ' '.join(words[:1])
answer = responses.get(key + (' dry' if '--dry-run' in sys.argv else ''), responses.get(key))
sys.stderr.write(answer.get('stderr', ''))
sys.stdout.write(json.dumps(answer['document']))
sys.exit(answer['rc'])
''' % sys.executable


def run_document(run_id=7, outcome='kept', state='kept', exit_code=0, error=None):
    return dict(schema_version=1, id=run_id, token='3f9a2c1e', recipe='website', outcome=outcome, state=state, exit_code=exit_code,
                error=error, phases=[dict(name='steps', status='done', duration_seconds=1.5, started_at=None, finished_at=None, detail=None)],
                snapshots=[dict(volume='/dev/mapper/site', state='live', size_bytes=25 << 20, peak_used_bytes=3 << 20)])


def error_document(rc, kind, message):
    return dict(schema_version=1, error=dict(exit_code=rc, kind=kind, message=message))


def module(name, arguments, responses, check_mode=False):
    """Runs the module as Ansible would (its arguments in a file); returns (result, guard's argv list)."""
    directory = tempfile.mkdtemp()
    guard = os.path.join(directory, 'guard')
    with open(guard, 'w') as f:
        f.write(FAKE_GUARD)
    os.chmod(guard, stat.S_IRWXU)
    with open(os.path.join(directory, 'responses.json'), 'w') as f:
        json.dump(responses, f)
    arguments = dict(arguments, binary=guard, _ansible_check_mode=check_mode, _ansible_tmpdir=directory)
    with open(os.path.join(directory, 'args.json'), 'w') as f:
        json.dump(dict(ANSIBLE_MODULE_ARGS=arguments), f)
    environment = dict(os.environ, PYTHONPATH=COLLECTIONS, FAKE_GUARD_LOG=os.path.join(directory, 'log'),
                       FAKE_GUARD_RESPONSES=os.path.join(directory, 'responses.json'))
    process = subprocess.run([sys.executable, '-m', 'ansible_collections.guard.guard.plugins.modules.' + name, os.path.join(directory, 'args.json')],
                             env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, check=False)
    assert process.stdout, process.stderr
    calls = []
    if os.path.exists(os.path.join(directory, 'log')):
        calls = [json.loads(line) for line in open(os.path.join(directory, 'log'))]
    return json.loads(process.stdout), calls


def test_run_skip_if_applied_is_idempotent_by_the_recipes_sha256():
    directory = tempfile.mkdtemp()
    recipe = os.path.join(directory, 'site.recipe')
    with open(recipe, 'w') as f:
        f.write('name: website\n')
    digest = hashlib.sha256(b'name: website\n').hexdigest()
    applied = dict(schema_version=1, runs=[dict(id=9, recipe_sha256=digest, outcome='rolled_back', state='finished'),
                                           dict(id=7, recipe_sha256=digest, outcome='kept', state='kept')])
    result, calls = module('guard_run', dict(recipe=recipe, skip_if_applied=True),
                           {'history': dict(rc=0, document=applied), 'show': dict(rc=0, document=run_document())})
    assert result['changed'] is False and not result.get('failed') and result['run_id'] == 7, result
    assert 'run 7 already applied' in result['skipped_reason']
    assert [call[0] for call in calls] == ['history', 'show'], 'no guard run'
    # Another text, or only a rolled-back run of it: the recipe runs.
    other = dict(schema_version=1, runs=[dict(id=9, recipe_sha256=digest, outcome='rolled_back', state='finished')])
    result, calls = module('guard_run', dict(recipe=recipe, skip_if_applied=True),
                           {'history': dict(rc=0, document=other), 'run': dict(rc=0, document=run_document(run_id=10))})
    assert result['changed'] is True and [call[0] for call in calls] == ['history', 'run'], calls


def test_run_kept_is_changed_with_the_run_facts():
    result, calls = module('guard_run', dict(recipe='/etc/guard/site.recipe', state_dir='/srv/guard'),
                           {'run': dict(rc=0, document=run_document(), stderr='step output\n')})
    assert not result.get('failed') and result['changed']
    assert result['run_id'] == 7 and result['outcome'] == 'kept' and result['rolled_back'] is False
    assert result['snapshots'][0]['peak_used_bytes'] == 3 << 20
    assert result['phases'][0]['name'] == 'steps' and result['stderr'] == 'step output\n'
    assert calls == [['run', '/etc/guard/site.recipe', '--json', '--state-dir', '/srv/guard']]


def test_a_rolled_back_run_fails_the_task_and_carries_its_facts():
    result, dummy = module('guard_run', dict(recipe='/r'),
                           {'run': dict(rc=1, document=run_document(outcome='rolled_back', state='finished', exit_code=1, error='verify failed'))})
    assert result['failed'] and result['rolled_back'] is True and result['changed'] is False
    assert result['run_id'] == 7 and result['outcome'] == 'rolled_back' and result['exit_code'] == 1
    assert 'verify failed' in result['msg']


def test_a_refused_run_fails_with_guards_message():
    result, dummy = module('guard_run', dict(recipe='/r'), {'run': dict(rc=75, document=error_document(75, 'busy', 'run 3 holds the volume'))})
    assert result['failed'] and result['msg'] == 'run 3 holds the volume' and result['exit_code'] == 75
    assert result['error']['kind'] == 'busy'


def test_check_mode_is_a_dry_run():
    plan = dict(schema_version=1, mode='dry_run', problems=[], valid=True)
    result, calls = module('guard_run', dict(recipe='/r'), {'run dry': dict(rc=0, document=plan)}, check_mode=True)
    assert result['changed'] and result['plan']['mode'] == 'dry_run'
    assert calls == [['run', '--dry-run', '/r', '--json']]
    refused = dict(plan, problems=['/dev/mapper/site is not active'])
    result, dummy = module('guard_run', dict(recipe='/r'), {'run dry': dict(rc=2, document=refused)}, check_mode=True)
    assert result['failed'] and 'is not active' in result['msg']


def test_pushed_content_is_a_private_file_removed_afterwards():
    result, calls = module('guard_run', dict(content='name: x\n'), {'run': dict(rc=0, document=run_document())})
    assert result['changed']
    path = calls[0][1]
    assert path.endswith('pushed.recipe') and not os.path.exists(path)


def test_not_json_is_a_clear_failure():
    result, dummy = module('guard_run', dict(recipe='/r'), {'run': dict(rc=0, document='not an object')})
    assert result['failed'] and 'schema_version' in result['msg']


@pytest.mark.parametrize('name, verb, done', [('guard_rollback', 'rollback', 'rolled_back'), ('guard_commit', 'commit', 'committed')])
def test_rollback_and_commit_act_on_a_kept_run_and_are_idempotent(name, verb, done):
    after = run_document(outcome=done, state='finished')
    result, calls = module(name, dict(run='7'), {'show': dict(rc=0, document=run_document()), verb: dict(rc=0, document=after)})
    assert result['changed'] and result['outcome'] == done
    assert [call[0] for call in calls] == ['show', verb]
    result, calls = module(name, dict(run='7'), {'show': dict(rc=0, document=after)})
    assert result['changed'] is False and [call[0] for call in calls] == ['show']
    if name == 'guard_commit':
        result, calls = module(name, dict(run='7'), {'show': dict(rc=0, document=run_document())}, check_mode=True)
        assert result['changed'] and [call[0] for call in calls] == ['show']


def test_a_rollback_in_check_mode_returns_guards_dry_run():
    plan = dict(schema_version=1, run=7, kept_at='2026-12-08T01:00:00.000Z', at_boot=False, stop_hooks=[], start_hooks=[],
                volumes=[dict(volume='/dev/mapper/site', unmounts=['/srv/site'], users=[], changed_bytes=14 << 20,
                              changed_at_end_bytes=4 << 20, changed_since_end_bytes=10 << 20)])
    result, calls = module('guard_rollback', dict(run='7'), {'show': dict(rc=0, document=run_document()), 'rollback dry': dict(rc=0, document=plan)},
                           check_mode=True)
    assert result['changed'] and result['plan']['volumes'][0]['changed_since_end_bytes'] == 10 << 20
    assert len(calls) == 2 and calls[0][0] == 'show' and calls[1][:3] == ['rollback', '--dry-run', '7']
    refused = error_document(3, 'attention', 'run 7 cannot be rolled back: its snapshot is stale')
    result, dummy = module('guard_rollback', dict(run='7'), {'show': dict(rc=0, document=run_document()), 'rollback dry': dict(rc=3, document=refused)},
                           check_mode=True)
    assert result['failed'] and 'stale' in result['msg']


def test_a_rollback_of_the_root_is_pending_until_a_reboot():
    pending = dict(run_document(), decision='rollback')
    result, calls = module('guard_rollback', dict(run='7'), {'show': dict(rc=0, document=run_document()), 'rollback': dict(rc=0, document=pending)})
    assert result['changed'] and result['pending_at_boot'] and result['reboot_required'] and not result['rebooting']
    assert result['outcome'] == 'kept', 'not reported as rolled back'
    result, calls = module('guard_rollback', dict(run='7'), {'show': dict(rc=0, document=pending)})
    assert result['changed'] is False and result['pending_at_boot'] and [call[0] for call in calls] == ['show']


def test_a_refused_rollback_fails_with_guards_message():
    result, dummy = module('guard_rollback', dict(run='7', wait=True),
                           {'show': dict(rc=0, document=run_document(outcome='committed', state='finished')),
                            'rollback': dict(rc=2, document=error_document(2, 'refused', 'run 7 is already committed; there is nothing to roll back'))})
    assert result['failed'] and 'already committed' in result['msg']


def test_info_returns_history_and_status_even_when_status_needs_attention():
    status = dict(schema_version=1, runs=[], stray_devices=[], attention=['run 7: COW 85% full'])
    result, calls = module('guard_info', dict(limit=5), {'history': dict(rc=0, document=dict(schema_version=1, runs=[run_document()])),
                                                         'status': dict(rc=3, document=status)})
    assert 'ansible_facts' not in result, 'an _info module returns no facts'
    facts = result
    assert not result.get('failed') and result['changed'] is False
    assert facts['history'][0]['id'] == 7 and facts['needs_attention'] is True and facts['status']['attention'] == ['run 7: COW 85% full']
    assert calls[0] == ['history', '--limit', '5', '--json']
