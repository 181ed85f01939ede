"""The project's import graph has no circle: every top-level .py file and diffusion/*.py, parsed with ast, with the
imports inside functions counted like those at the top."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules():
    """{module name: path}: the top-level scripts and modules, and the diffusion package's modules."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    package = os.path.join(ROOT, "diffusion")
    for name in os.listdir(package):
        if name.endswith(".py"):
            module = "diffusion" if name == "__init__.py" else f"diffusion.{name[:-3]}"
            modules[module] = os.path.join(package, name)
    return modules


def imported_modules(path, module, modules):
    """The project modules that `module` imports anywhere in its file (absolute, relative, `from x import y`)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .respace import ... inside diffusion/
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # diffusion.respace.space_timesteps -> diffusion.respace
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
                package_of_name = name.rpartition(".")[0]
                if package_of_name and not module.startswith(package_of_name + "."):
                    found.add(package_of_name)  # importing diffusion.respace runs diffusion/__init__.py first
    return found


def import_graph():
    modules = project_modules()
    return {module: imported_modules(path, module, modules) for module, path in modules.items()}


def strongly_connected(graph):
    """The strongly connected components of graph {module: imported modules} (Tarjan), each a sorted list."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def shortest_circle(graph, component):
    """A shortest circle through the first module of a strongly connected component: [a, b, ..., a]."""
    start, inside = component[0], set(component)
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & inside):
                if target == start:
                    circle = [module]
                    while previous[circle[-1]] is not None:
                        circle.append(previous[circle[-1]])
                    return circle[::-1] + [start]
                if target not in previous:
                    previous[target] = module
                    following.append(target)
        frontier = following
    return None


def cycles(graph):
    """One circle per group of modules that import each other (a strongly connected component of two or more)."""
    return [shortest_circle(graph, component) for component in strongly_connected(graph) if len(component) > 1]


def test_the_graph_sees_imports_inside_functions_and_relative_imports(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os\n\ndef main():\n    from models import DiT\n    import diffusion.respace\n")
    assert imported_modules(str(script), "script", project_modules()) == {"models", "diffusion.respace", "diffusion"}
    graph = import_graph()
    assert "export" in graph["experiments"]  # imported inside a function
    assert "diffusion.respace" in graph["diffusion"]  # from .respace import ...
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"a"}, "d": set()}) == [["a", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_in_a_circle():
    graph = import_graph()
    groups = [component for component in strongly_connected(graph) if len(component) > 1]
    assert not groups, "modules that import each other in a circle:\n" + "\n".join(
        f"{' -> '.join(shortest_circle(graph, group))} (the group: {', '.join(group)})" for group in groups)


def test_experiment_scripts_are_leaves():
    """The digits experiments import experiments.py and the library, never each other; nothing imports them."""
    graph = import_graph()
    importers = {script: sorted(m for m in graph if script in graph[m])
                 for script in ("run_digits", "fewstep", "samplers", "ablation")}
    assert not any(importers.values()), importers
