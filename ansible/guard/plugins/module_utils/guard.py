# -*- coding: utf-8 -*-
# Copyright: guard authors
# Apache License 2.0 (see LICENSE in the guard repository)
"""Runs the guard command with --json and reads its one document (Docs/guide.md, "JSON output")."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

# guard's exit codes (Docs/guide.md, "Exit codes").
EXIT_SUCCESS = 0
EXIT_ROLLED_BACK = 1
EXIT_REFUSED = 2
EXIT_ATTENTION = 3
EXIT_NEEDS_REASSEMBLY = 4
EXIT_BUSY = 75

# The document shape these modules read; guard adds fields without changing it.
SCHEMA_VERSION = 1

COMMON_ARGS = dict(
    state_dir=dict(type='path'),
    config=dict(type='path'),
    binary=dict(type='path'),
)


class GuardError(Exception):
    def __init__(self, message, rc=None, stderr=None, document=None):
        super(GuardError, self).__init__(message)
        self.rc = rc
        self.stderr = stderr
        self.document = document


class Guard(object):
    """One guard binary, state directory and configuration, as the module's parameters say."""

    def __init__(self, module):
        self.module = module
        binary = module.params.get('binary')
        self.binary = binary or module.get_bin_path('guard', required=True, opt_dirs=['/usr/sbin', '/usr/local/sbin'])

    def command(self, *arguments):
        argv = [self.binary] + list(arguments) + ['--json']
        if self.module.params.get('state_dir'):
            argv += ['--state-dir', self.module.params['state_dir']]
        if self.module.params.get('config'):
            argv += ['--config', self.module.params['config']]
        return argv

    def run(self, *arguments):
        """Runs `guard ARGUMENTS --json`: (exit code, document, stderr). The document is the
        command's own, or guard's error document ({"error": {...}}) when it failed first."""
        argv = self.command(*arguments)
        rc, stdout, stderr = self.module.run_command(argv, check_rc=False)
        try:
            document = json.loads(stdout)
        except ValueError:
            raise GuardError('%s printed no JSON document (exit %s): %s' % (' '.join(argv), rc, stderr.strip() or stdout.strip()), rc, stderr)
        if not isinstance(document, dict) or document.get('schema_version') != SCHEMA_VERSION:
            raise GuardError('%s printed a document of schema_version %r; these modules read version %d (upgrade the collection or guard)'
                             % (' '.join(argv), document.get('schema_version') if isinstance(document, dict) else None, SCHEMA_VERSION), rc, stderr, document)
        return rc, document, stderr

    def fail(self, message, rc=None, stderr=None, **facts):
        self.module.fail_json(msg=message, rc=rc, stderr=stderr, **facts)

    def show(self, run):
        """The run's document (`guard show --json RUN`); fails the module when there is none."""
        rc, document, stderr = self.run('show', str(run))
        if rc != EXIT_SUCCESS or is_error_document(document):
            self.fail(error_message(document, stderr), rc=rc, stderr=stderr, error=document.get('error'))
        return document


def is_error_document(document):
    """guard's error document ({"error": {...}}); a run's own `error` field is a string or null."""
    return isinstance(document, dict) and isinstance(document.get('error'), dict)


def error_message(document, stderr):
    error = document.get('error') if isinstance(document, dict) else None
    if isinstance(error, dict) and error.get('message'):
        return error['message']
    return (stderr or '').strip() or 'guard failed'


def run_facts(document):
    """What a play needs of a run: its id, outcome and COW figures, and the whole document."""
    snapshots = document.get('snapshots') or []
    return dict(
        run_id=document.get('id'),
        token=document.get('token'),
        outcome=document.get('outcome'),
        state=document.get('state'),
        exit_code=document.get('exit_code'),
        phases=[dict(name=phase.get('name'), status=phase.get('status'), duration_seconds=phase.get('duration_seconds'))
                for phase in document.get('phases') or []],
        snapshots=[dict(volume=s.get('volume'), state=s.get('state'), size_bytes=s.get('size_bytes'), peak_used_bytes=s.get('peak_used_bytes'))
                   for s in snapshots],
        run=document,
    )


def settle(module, verb, done_outcome, extra_arguments=()):
    """guard_rollback and guard_commit: unchanged when the run already has `done_outcome`,
    otherwise `guard VERB --json RUN` (check mode: only says it would)."""
    guard = Guard(module)
    run = module.params['run']
    try:
        before = guard.show(run)
        if before.get('outcome') == done_outcome:
            module.exit_json(changed=False, **run_facts(before))
        if module.check_mode:
            if before.get('state') != 'kept':
                how = before.get('outcome') or before.get('state')
                guard.fail('run %s is %s, not kept: guard would refuse to %s it' % (run, how, verb), **run_facts(before))
            module.exit_json(changed=True, **run_facts(before))
        rc, document, stderr = guard.run(*([verb] + list(extra_arguments) + [str(run)]))
    except GuardError as error:
        module.fail_json(msg=str(error), rc=error.rc, stderr=error.stderr)
    if is_error_document(document):
        guard.fail(error_message(document, stderr), rc=rc, stderr=stderr, error=document['error'], **run_facts(before))
    module.exit_json(changed=True, stderr=stderr, **run_facts(document))
