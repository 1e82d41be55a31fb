"""The program a pipeline component runs, built from a step's own module files: what the KFP v1 and v2 pipeline scripts
share to embed a step, without importing either pipeline SDK.

A step is a module of small top-level functions (load_data.py, train.py, evaluate.py, export.py, promote.py beside this
file). Both SDKs copy only one function's source into a lightweight component, so the component's program gets the
step's modules themselves: each module file's text, verbatim, as a string that the program writes back to a file of
the module's name before anything runs. (Real files, not modules made in memory: TensorFlow's AutoGraph reads the
source of the functions it converts, and tracebacks show the lines.) The step's function then imports it as it does here
(`from promote import promote`), and tests/test_pipeline*.py check that every embedded text equals the file as
committed, so a component can never run stale code.

    python3 -c "import component_source; print(component_source.module_loader(['serving_folder'])[:300])"
"""
import ast
import os

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# The modules each step's component embeds, in the order they import each other; the step is the function of the last
# one, named like it (promote.promote).
STEP_MODULES = {
    'load-data': ('evidence', 'load_data'),
    'train': ('train',),
    'evaluate': ('drift', 'evaluate'),
    'export': ('drift', 'export'),
    'promote': ('serving_folder', 'evidence', 'promote'),
}
# The function that registers one embedded module; its name marks the embedded texts for the tests that read them.
DEFINE_MODULE = '_define_module'
LOADER_HEAD = f'''\
# The step's modules, embedded verbatim from the repository's mnist_model/ folder (component_source.py), are written
# to files of their own names in a folder of their own, where `import name` finds them as it does in the repository.
import os as _os
import sys as _sys
import tempfile as _tempfile

_MODULE_DIR = _tempfile.mkdtemp(prefix='step-modules-')
_sys.path.insert(0, _MODULE_DIR)


def {DEFINE_MODULE}(name, source):
    with open(_os.path.join(_MODULE_DIR, name + '.py'), 'w', encoding='utf-8') as module_file:
        module_file.write(source)

'''


def signature_stub(step_name):
    """Source text of a module holding only the step function's definition -- its signature, annotations and
    docstring, with an empty body -- read from the step's module file without importing it (and TensorFlow with it),
    for an SDK to read the component's interface from. The parameter trained_model (the model in memory, when
    mnist.run runs the steps in one process) is left out: between components only files travel."""
    module_name = STEP_MODULES[step_name][-1]
    tree = ast.parse(module_source(module_name))
    (definition,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == module_name]
    arguments = definition.args
    names = [argument.arg for argument in arguments.args]
    if 'trained_model' in names:
        position = names.index('trained_model')
        default_position = position - (len(arguments.args) - len(arguments.defaults))
        del arguments.args[position]
        if default_position >= 0:
            del arguments.defaults[default_position]
    definition.body = [definition.body[0], ast.Expr(ast.Constant(...))]
    return ('from typing import NamedTuple\n\nfrom kfp.components import InputPath, OutputPath\n\n\n'
            + ast.unparse(definition) + '\n')


def module_source(name):
    """The text of mnist_model/<name>.py as committed."""
    with open(os.path.join(MODULE_DIR, name + '.py'), encoding='utf-8') as module_file:
        return module_file.read()


def literal(source):
    """The source as a Python string literal: a raw triple-quoted one, which keeps the text readable in the compiled
    pipeline, wherever the text allows it, else its repr."""
    if "'''" not in source and not source.endswith('\\'):
        return "r'''" + source + "'''"
    return repr(source)


def module_loader(names):
    """Program text that defines the modules `names`, in that order, from their verbatim sources."""
    return LOADER_HEAD + ''.join(f'\n{DEFINE_MODULE}({name!r}, {literal(module_source(name))})\n' for name in names)


def function_lines(program, function_name):
    """The (first, last) line numbers, from 1, of the top-level function definition function_name in program."""
    for node in ast.parse(program).body:
        if isinstance(node, ast.FunctionDef) and node.name == function_name:
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            return first, node.end_lineno
    raise ValueError(f'no top-level function {function_name} in the component program')


def embed_step(program, step_name, function_name, replace_function):
    """The component program with the step's modules embedded just before the top-level function function_name.
    With replace_function, that function's copy (kfp 1.8 copies the step function itself) is replaced by an import of
    the step function from its embedded module; without it (a v2 adapter that imports the step itself) it stays."""
    names = STEP_MODULES[step_name]
    lines = program.split('\n')
    first, last = function_lines(program, function_name)
    kept = [f'from {names[-1]} import {names[-1]}'] if replace_function else lines[first - 1:last]
    return '\n'.join(lines[:first - 1] + [module_loader(names)] + kept + lines[last:])


def embedded_modules(program):
    """{module name: source} of the modules embedded in a component program, read back from its syntax tree."""
    modules = {}
    for node in ast.walk(ast.parse(program)):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == DEFINE_MODULE:
            name, source = (argument.value for argument in node.args)
            modules[name] = source
    return modules
