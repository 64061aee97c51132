#!/usr/bin/env python3
"""Validate one guard --json document against its schema in Docs/schema/.

Usage: validate-json.py [--strict] SCHEMA [FILE]   (SCHEMA: run, history, ... or a path; FILE: default stdin;
       a FILE ending in .recipe, .yaml or .yml is read as YAML: Docs/schema/input/recipe.schema.json)
       validate-json.py --serve          (for test suites: one process validates many documents, strictly)
Prints every violation with its place in the document; exits 0 when valid, 1 when not,
2 when the schema or the document cannot be read. Needs python3-jsonschema (Draft 2020-12).

The schemas allow fields they do not name (a newer guard may add some: read the fields you
know). --strict, guard's own tests, refuses them: every field guard prints is documented.

--serve reads lines "SCHEMA<TAB>FILE" on stdin and answers each with one line of JSON on
stdout: {"valid": true} or {"valid": false, "errors": "..."} (what the one-shot form prints).
"""
import json
import os
import sys

try:
    import jsonschema
except ImportError:
    sys.exit("validate-json: python3-jsonschema is not installed (apt-get install python3-jsonschema)")


def schema_path(name):
    return name if os.sep in name else os.path.join(os.path.dirname(__file__), "..", "..", "Docs", "schema", name + ".schema.json")


def closed(schema):
    """The schema with every object that names its properties closed to others."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(value) for value in schema]
    return schema


def load_validator(name, strict=False):
    """The validator of a schema, or raises ValueError/OSError/SchemaError saying why not."""
    path = schema_path(name)
    with open(path) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    if strict:
        schema = closed(schema)
    return path, jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def violations(path, validator, document):
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return ["%s: %s: %s" % (os.path.basename(path), "/".join(map(str, e.absolute_path)) or "(the document)", e.message) for e in errors]


def serve():
    validators = {}
    for line in sys.stdin:
        name, _, file = line.rstrip("\n").partition("\t")
        try:
            if name not in validators:
                validators[name] = load_validator(name, strict=True)
            path, validator = validators[name]
            with open(file) as f:
                document = json.load(f)
            errors = violations(path, validator, document)
        except (OSError, ValueError, jsonschema.SchemaError) as error:
            errors = ["%s: %s" % (name, error)]
        print(json.dumps({"valid": not errors, "errors": "\n".join(errors)}), flush=True)


def main():
    if sys.argv[1:] == ["--serve"]:
        return serve()
    arguments = sys.argv[1:]
    strict = arguments[:1] == ["--strict"]
    if strict:
        arguments = arguments[1:]
    if len(arguments) not in (1, 2):
        sys.exit(__doc__.strip().splitlines()[2])
    try:
        path, validator = load_validator(arguments[0], strict=strict)
    except (OSError, ValueError, jsonschema.SchemaError) as error:
        print(f"validate-json: {schema_path(arguments[0])}: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        source = open(arguments[1]) if len(arguments) == 2 else sys.stdin
        if len(arguments) == 2 and arguments[1].endswith((".recipe", ".yaml", ".yml")):
            # A recipe (Docs/schema/input/recipe.schema.json) is YAML: python3-yaml reads it.
            import yaml
            document = yaml.safe_load(source)
        else:
            document = json.load(source)
    except Exception as error:  # json's ValueError, yaml's YAMLError
        print(f"validate-json: not one JSON (or YAML) document: {error}", file=sys.stderr)
        sys.exit(2)
    errors = violations(path, validator, document)
    for error in errors:
        print(error, file=sys.stderr)
    sys.exit(1 if errors else 0)


main()
