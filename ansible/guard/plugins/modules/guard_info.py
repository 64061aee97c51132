#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: guard_info
short_description: guard's history and status on a host
description:
  - Reads C(guard history --json) and C(guard status --json); changes nothing.
  - Returns C(history) (the newest runs first) and C(status) (open runs, their snapshots' COW use
    and merges, stray devices, and what needs a person) as plain return values, not facts, as an
    C(_info) module must. Register the result to use them.
  - Before version 0.2.0 they were returned as C(ansible_facts.guard).
version_added: 0.1.0
author:
  - guard authors (@guard)
extends_documentation_fragment:
  - guard.guard.guard
options:
  limit:
    description:
      - At most this many runs of the history.
    type: int
    default: 50
  recipe:
    description:
      - Only runs of this recipe (its name).
    type: str
'''

EXAMPLES = r'''
- name: What guard did here
  guard.guard.guard_info:
    limit: 5
  register: guard_here

- name: Hosts that need a person
  ansible.builtin.debug:
    var: guard_here.status.attention
  when: guard_here.needs_attention
'''

RETURN = r'''
history:
  description: The runs, newest first, as C(guard history --json) prints them (history.schema.json's C(runs)).
  returned: always
  type: list
  elements: dict
status:
  description: C(guard status --json)'s document (status.schema.json).
  returned: always
  type: dict
needs_attention:
  description: Whether C(guard status) exits 3 (something needs a person; C(status.attention) says what).
  returned: always
  type: bool
needs_reassembly:
  description: Whether C(guard status) exits 4 (a kept snapshot is not live; run C(guard recover)).
  returned: always
  type: bool
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.guard.guard.plugins.module_utils.guard import (
    COMMON_ARGS, EXIT_ATTENTION, EXIT_NEEDS_REASSEMBLY, EXIT_SUCCESS, Guard, GuardError, error_message, is_error_document)


def main():
    argument_spec = dict(limit=dict(type='int', default=50), recipe=dict(type='str'))
    argument_spec.update(COMMON_ARGS)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    guard = Guard(module)
    history_arguments = ['history', '--limit', str(module.params['limit'])]
    if module.params['recipe']:
        history_arguments += ['--recipe', module.params['recipe']]
    try:
        rc, history, stderr = guard.run(*history_arguments)
        if rc != EXIT_SUCCESS:
            module.fail_json(msg=error_message(history, stderr), rc=rc, stderr=stderr)
        # status exits 3 (needs attention) or 4 (needs reassembly) with its document: facts, not a failure.
        status_rc, status, stderr = guard.run('status')
        if status_rc not in (EXIT_SUCCESS, EXIT_ATTENTION, EXIT_NEEDS_REASSEMBLY) or is_error_document(status):
            module.fail_json(msg=error_message(status, stderr), rc=status_rc, stderr=stderr)
    except GuardError as error:
        module.fail_json(msg=str(error), rc=error.rc, stderr=error.stderr)
    module.exit_json(changed=False, history=history['runs'], status=status,
                     needs_attention=status_rc == EXIT_ATTENTION, needs_reassembly=status_rc == EXIT_NEEDS_REASSEMBLY)


if __name__ == '__main__':
    main()
