#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: guard_rollback
short_description: Roll back a kept guard run
description:
  - Runs C(guard rollback --json RUN) on the host; the volumes read as before the run from the moment the merge starts.
  - Unchanged when the run is already rolled back. Any other refusal (committed, unfinished, an invalid snapshot) fails with guard's message.
  - In check mode it reads the run (C(guard show --json)) and asks guard what the rollback would do and throw away
    (C(guard rollback --dry-run --json)), returned as I(plan); a rollback guard would refuse fails with guard's message.
  - A run that includes C(/) or C(/usr) cannot be merged while the system runs; guard journals its rollback for the next boot,
    whose initramfs merges it before mounting the root. The module then returns I(pending_at_boot) and I(reboot_required), and
    reboots the host when I(reboot) is true; until the reboot the rollback has not happened.
version_added: 0.1.0
author:
  - guard authors (@guard)
extends_documentation_fragment:
  - guard.guard.guard
options:
  run:
    description:
      - The run's number or token, as C(guard history) and M(guard.guard.guard_run) return it.
    type: str
    required: true
  wait:
    description:
      - Wait until the merge is complete and torn down.
    type: bool
    default: false
  reboot:
    description:
      - When the rollback waits for the next boot (a run of C(/) or C(/usr)), reboot the host (C(systemctl reboot), 5 seconds later, so
        the module returns first). Follow the task with M(ansible.builtin.wait_for_connection).
      - Without it, the play decides, with I(reboot_required) (for example M(ansible.builtin.reboot)).
    type: bool
    default: false
seealso:
  - module: guard.guard.guard_run
  - module: guard.guard.guard_commit
'''

EXAMPLES = r'''
- name: Undo last night's upgrade
  guard.guard.guard_rollback:
    run: "{{ upgrade.run_id }}"
    wait: true

- name: Undo an upgrade of the root filesystem, and reboot for it
  guard.guard.guard_rollback:
    run: "{{ upgrade.run_id }}"
    reboot: true
  register: rollback

- name: Wait for the host to come back on the old root
  ansible.builtin.wait_for_connection:
    delay: 20
  when: rollback.rebooting
'''

RETURN = r'''
run_id:
  description: The run's number.
  returned: always
  type: int
outcome:
  description: rolled_back after a rollback.
  returned: always
  type: str
state:
  description: merging while the merge runs (without I(wait)), finished after.
  returned: always
  type: str
snapshots:
  description: Each volume's snapshot with its state, size and peak COW use.
  returned: always
  type: list
  elements: dict
run:
  description: The run afterwards, as C(guard show --json) prints it.
  returned: always
  type: dict
pending_at_boot:
  description: The rollback is journaled for the next boot (a run of C(/) or C(/usr)) and has not happened yet.
  returned: always
  type: bool
reboot_required:
  description: The rollback waits for a reboot that the module did not start.
  returned: always
  type: bool
rebooting:
  description: The module started the reboot (I(reboot)).
  returned: always
  type: bool
plan:
  description:
    - What the rollback would do and throw away, as C(guard rollback --dry-run --json) prints it (its rollback-plan schema);
      per volume I(changed_since_end_bytes) is at least how much written since the run ended would be lost.
  returned: in check mode, for a kept run
  type: dict
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.guard.guard.plugins.module_utils.guard import (
    COMMON_ARGS, Guard, GuardError, error_message, is_error_document, run_facts)


def pending_at_boot(document):
    """A kept run whose decision is rollback: journaled for the next boot, not done."""
    return document.get('state') == 'kept' and document.get('decision') == 'rollback'


def main():
    argument_spec = dict(run=dict(type='str', required=True), wait=dict(type='bool', default=False), reboot=dict(type='bool', default=False))
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    guard = Guard(module)
    run = module.params['run']

    def finish(document, changed, stderr=None):
        pending = pending_at_boot(document)
        rebooting = False
        if pending and module.params['reboot'] and not module.check_mode:
            rc, dummy, err = module.run_command(['systemd-run', '--on-active=5', '--unit=guard-rollback-reboot', 'systemctl', 'reboot'], check_rc=False)
            if rc != 0:
                guard.fail('run %s rolls back at the next boot, and the reboot could not be started: %s' % (run, err.strip()), rc=rc, **run_facts(document))
            rebooting = True
        module.exit_json(changed=changed or rebooting, stderr=stderr, pending_at_boot=pending, reboot_required=pending and not rebooting,
                         rebooting=rebooting, **run_facts(document))

    try:
        before = guard.show(run)
        if before.get('outcome') == 'rolled_back' or pending_at_boot(before):
            finish(before, changed=False)
        if module.check_mode:
            rc, plan, stderr = guard.run('rollback', '--dry-run', str(run))
            if is_error_document(plan):
                guard.fail(error_message(plan, stderr), rc=rc, stderr=stderr, error=plan['error'], **run_facts(before))
            module.exit_json(changed=True, plan=plan, pending_at_boot=False, reboot_required=False, rebooting=False, **run_facts(before))
        rc, document, stderr = guard.run(*(['rollback'] + (['--wait'] if module.params['wait'] else []) + [str(run)]))
    except GuardError as error:
        module.fail_json(msg=str(error), rc=error.rc, stderr=error.stderr)
    if is_error_document(document):
        guard.fail(error_message(document, stderr), rc=rc, stderr=stderr, error=document['error'], **run_facts(before))
    finish(document, changed=True, stderr=stderr)


if __name__ == '__main__':
    main()
