#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: guard_run
short_description: Run an upgrade recipe under guard's snapshots
description:
  - Runs C(guard run --json) on a recipe file on the host, or on recipe text pushed with I(content).
  - guard snapshots every volume the recipe names, runs its steps and verify checks, then commits, keeps or rolls back.
  - A kept or committed run is C(changed). A run that guard rolled back is a failed task that carries the run's facts,
    so a C(serial) play stops before the next batch.
  - In check mode it runs C(guard run --dry-run --json), which touches nothing.
  - With I(skip_if_applied), a second play with the same recipe changes nothing (idempotence) when the
    host's journal already has a run of the very same recipe text that applied its upgrade.
version_added: 0.1.0
author:
  - guard authors (@guard)
extends_documentation_fragment:
  - guard.guard.guard
options:
  recipe:
    description:
      - Path of the recipe file on the host. It must be owned by root and not writable by others, unless I(allow_unsafe_recipe).
    type: path
  content:
    description:
      - The recipe's text, written to a private temporary file on the host for the run.
    type: str
  allow_unsafe_recipe:
    description:
      - Run a recipe that users other than root can modify.
    type: bool
    default: false
  skip_if_applied:
    description:
      - Do nothing when C(guard history) has a run of this exact recipe text (its SHA-256, as the
        journal keeps it) whose upgrade is applied, committed or still kept; a run that was rolled
        back later, failed or is stale does not count. The result is not C(changed) and carries that
        run's facts and I(skipped_reason). Only the newest 1000 runs are looked at.
    type: bool
    default: false
    version_added: 0.2.0
notes:
  - The steps' output goes to guard's stderr, returned as I(stderr).
seealso:
  - module: guard.guard.guard_rollback
  - module: guard.guard.guard_commit
  - module: guard.guard.guard_info
'''

EXAMPLES = r'''
- name: Upgrade nginx under guard, keeping the snapshot for a later rollback
  guard.guard.guard_run:
    recipe: /etc/guard/nginx-apt-upgrade.recipe
  register: upgrade

- name: Push the recipe with the play
  guard.guard.guard_run:
    content: "{{ lookup('ansible.builtin.file', 'website-migration.recipe') }}"
'''

RETURN = r'''
run_id:
  description: The run's number in the host's journal (null in check mode).
  returned: when guard made a run
  type: int
  sample: 12
token:
  description: The run's token.
  returned: when guard made a run
  type: str
outcome:
  description: committed, kept, rolled_back, failed or recovered.
  returned: when guard made a run
  type: str
  sample: kept
state:
  description: finished, kept, ...
  returned: when guard made a run
  type: str
exit_code:
  description: guard's exit code (0 applied, 1 rolled back, 3 needs a person).
  returned: always
  type: int
rolled_back:
  description: The upgrade failed and guard restored the volumes.
  returned: always
  type: bool
phases:
  description: Each phase with its status and duration.
  returned: when guard made a run
  type: list
  elements: dict
snapshots:
  description: Each volume's snapshot with its state, size and peak COW use (bytes).
  returned: when guard made a run
  type: list
  elements: dict
run:
  description: The whole run as C(guard show --json) prints it (Docs/schema/run.schema.json).
  returned: when guard made a run
  type: dict
plan:
  description: In check mode, the plan of C(guard run --dry-run --json) (Docs/schema/plan.schema.json).
  returned: check mode
  type: dict
stderr:
  description: guard's progress and the steps' output.
  returned: always
  type: str
skipped_reason:
  description: With I(skip_if_applied), why nothing was run (the run that applied this recipe).
  returned: when an earlier run applied the recipe
  type: str
'''

import hashlib
import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.guard.guard.plugins.module_utils.guard import (
    COMMON_ARGS, EXIT_ROLLED_BACK, EXIT_SUCCESS, Guard, GuardError, error_message, is_error_document, run_facts)


def applied_run(history, digest):
    """The newest run of the recipe text with this SHA-256 whose upgrade is in place, or None."""
    for run in history.get('runs') or []:
        if run.get('recipe_sha256') == digest and run.get('outcome') in ('committed', 'kept') and run.get('state') in ('finished', 'kept'):
            return run
    return None


def skip_if_applied(module, guard, recipe):
    """Exits unchanged, with the earlier run's facts, when that recipe text already applied its upgrade."""
    with open(recipe, 'rb') as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    rc, history, stderr = guard.run('history', '--limit', '1000')
    if rc != EXIT_SUCCESS or is_error_document(history):
        module.fail_json(msg=error_message(history, stderr), rc=rc, stderr=stderr)
    run = applied_run(history, digest)
    if run is None:
        return
    rc, document, stderr = guard.run('show', str(run['id']))
    if rc != EXIT_SUCCESS or is_error_document(document):
        module.fail_json(msg=error_message(document, stderr), rc=rc, stderr=stderr)
    module.exit_json(changed=False, rolled_back=False, stderr=stderr,
                     skipped_reason='run %s already applied this recipe (sha256 %s, %s)' % (run['id'], digest[:12], run['outcome']),
                     **run_facts(document))


def main():
    argument_spec = dict(
        recipe=dict(type='path'),
        content=dict(type='str'),
        allow_unsafe_recipe=dict(type='bool', default=False),
        skip_if_applied=dict(type='bool', default=False),
    )
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, mutually_exclusive=[('recipe', 'content')],
                           required_one_of=[('recipe', 'content')], supports_check_mode=True)
    guard = Guard(module)
    directory = None
    recipe = module.params['recipe']
    try:
        if module.params['content'] is not None:
            directory = tempfile.mkdtemp(prefix='guard-recipe-', dir=module.tmpdir)
            recipe = os.path.join(directory, 'pushed.recipe')
            with open(recipe, 'w') as handle:
                handle.write(module.params['content'])
            os.chmod(recipe, 0o600)
        if module.params['skip_if_applied']:
            skip_if_applied(module, guard, recipe)
        arguments = ['run']
        if module.params['allow_unsafe_recipe']:
            arguments.append('--allow-unsafe-recipe')
        if module.check_mode:
            arguments.append('--dry-run')
        rc, document, stderr = guard.run(*(arguments + [recipe]))
    except GuardError as error:
        module.fail_json(msg=str(error), rc=error.rc, stderr=error.stderr)
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    if is_error_document(document):
        # Refused (nothing was touched), busy, or needs a person: guard's own words.
        module.fail_json(msg=error_message(document, stderr), exit_code=rc, rolled_back=False, error=document['error'], stderr=stderr)
    if module.check_mode:
        if rc != EXIT_SUCCESS:
            module.fail_json(msg='a real run would be refused: ' + '; '.join(document.get('problems') or []), exit_code=rc,
                             rolled_back=False, plan=document, stderr=stderr)
        module.exit_json(changed=True, exit_code=rc, rolled_back=False, plan=document, stderr=stderr)

    facts = run_facts(document)
    if rc == EXIT_SUCCESS:
        module.exit_json(changed=True, rolled_back=False, stderr=stderr, **facts)
    if rc == EXIT_ROLLED_BACK:
        facts['exit_code'] = rc
        module.fail_json(msg='run %s was rolled back: %s; the volumes are as before the run' % (facts['run_id'], document.get('error') or 'it failed'),
                         changed=False, rolled_back=True, stderr=stderr, **facts)
    facts['exit_code'] = rc
    module.fail_json(msg='run %s needs attention (exit %d): %s' % (facts['run_id'], rc, document.get('error') or stderr.strip()),
                     changed=True, rolled_back=False, stderr=stderr, **facts)


if __name__ == '__main__':
    main()
