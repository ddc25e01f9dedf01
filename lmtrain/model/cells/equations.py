"""A cell's step, written once: its equations over named pre-activations, states and per-unit
parameters, from which every fast path is generated.

    def gru(x, u, s, p, f):
        r = f.sigmoid(x.r + u.r)
        z = f.sigmoid(x.z + u.z)
        n = f.tanh(x.n + r * u.n)
        return {"h": n + z * (s.h - n)}

    STEP = Step(gates=("r", "z", "n"), states=("h",), equations=gru, recurrent_bias=True)

x: each gate's input pre-activation (W x + b_ih), u: its recurrent one (U h, + b_hh with
recurrent_bias), s: the old states, p: the per-unit parameters' blocks (`extra`: parameter name ->
its H-wide blocks' names), f: the functions (sigmoid, tanh, exp, log_sigmoid, maximum). The
function returns every new state by name; h (states[0]) is the layer's output.

The equations run once, on symbols: each operation makes a node of an expression graph, and an
expression written twice is one node. The backward is derived from that graph by reverse-mode
differentiation (`derive`), each function's derivative written through its own output where it
can be (σ' = σ(1 - σ), tanh' = 1 - tanh², exp' = exp). What the backward needs of the forward is
decided once, for every backend: states and parameters are read again, the outputs of functions
and the pre-activations are saved by the forward, arithmetic on those is recomputed.

The emitters turn a `Program` into code: lmtrain/model/kernels/emit_torch.py (the engine's
forward_step and backward_step, the path on CUDA and without the C++ ops) and emit_cpp.py (the
functor of the CPU time loops and of the generation step). Every cell keeps its plain-autograd
`reference` beside its STEP, and the tests hold every generated path to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

LEAVES = ("x", "u", "s", "p", "d", "const")  # d: the gradient reaching a new state
FUNCTIONS = ("sigmoid", "tanh", "exp", "log_sigmoid")  # one argument; saved when the backward needs them
ARITHMETIC = ("add", "sub", "mul", "div", "neg")  # recomputed in the backward
# maximum(a, b); split(a, b) = 1, 1/2 or 0 as a > b, a = b, a < b: the share of maximum's gradient
# that goes to a (torch.maximum's rule), saved like a function
CHOICES = ("maximum", "split")


class Node:
    """One value of the graph: a leaf (op in LEAVES, `index` its block or constant) or an operation
    on `args`. Made only by Graph.make, which returns an existing node for an expression made
    before, so `is` compares expressions. `grad`: whether it depends on a gradient (a backward value)."""

    __slots__ = ("graph", "op", "args", "index", "id", "grad")

    def __init__(self, graph: Graph, op: str, args: tuple[Node, ...], index: float | int, id: int):
        self.graph, self.op, self.args, self.index, self.id = graph, op, args, index, id
        self.grad = op == "d" or any(a.grad for a in args)

    def _other(self, value) -> Node:
        return value if isinstance(value, Node) else self.graph.const(float(value))

    def __add__(self, other):
        return self.graph.make("add", self, self._other(other))

    def __radd__(self, other):
        return self.graph.make("add", self._other(other), self)

    def __sub__(self, other):
        return self.graph.make("sub", self, self._other(other))

    def __rsub__(self, other):
        return self.graph.make("sub", self._other(other), self)

    def __mul__(self, other):
        return self.graph.make("mul", self, self._other(other))

    def __rmul__(self, other):
        return self.graph.make("mul", self._other(other), self)

    def __truediv__(self, other):
        return self.graph.make("div", self, self._other(other))

    def __rtruediv__(self, other):
        return self.graph.make("div", self._other(other), self)

    def __neg__(self):
        return self.graph.make("neg", self)

    def is_const(self, value: float | None = None) -> bool:
        return self.op == "const" and (value is None or self.index == value)

    def __repr__(self) -> str:
        return f"v{self.id}:{self.op}{'' if not self.args else tuple(a.id for a in self.args)}"


class Graph:
    """The nodes of one cell's step, in the order made (so every node comes after its arguments)."""

    def __init__(self):
        self.nodes: list[Node] = []
        self._known: dict[tuple, Node] = {}

    def leaf(self, op: str, index: float | int) -> Node:
        return self._intern((op, (), index))

    def const(self, value: float) -> Node:
        return self.leaf("const", float(value))

    def make(self, op: str, *args: Node) -> Node:
        """The node `op(args)`, simplified where that is exact (x + 0, x · 1, x · 0, --x, constants
        folded), and the same node each time the same expression is made."""
        a = args[0]
        b = args[1] if len(args) > 1 else None
        if op in ARITHMETIC and all(x.is_const() for x in args):
            values = [x.index for x in args]
            folded = {"add": lambda: values[0] + values[1], "sub": lambda: values[0] - values[1],
                      "mul": lambda: values[0] * values[1], "div": lambda: values[0] / values[1],
                      "neg": lambda: -values[0]}[op]()
            return self.const(folded)
        if op in ("add", "mul") and a.is_const():  # a constant to the right: one form for both orders
            a, b = b, a
        if op in ("add", "sub") and b.is_const(0.0) or op in ("mul", "div") and b.is_const(1.0):
            return a
        if op == "sub" and a.is_const(0.0):
            return self.make("neg", b)
        if op == "mul" and b.is_const(0.0):
            return b
        if op == "neg" and a.op == "neg":
            return a.args[0]
        return self._intern((op, (a,) if b is None else (a, b), 0))

    def _intern(self, key: tuple) -> Node:
        op, args, index = key
        known = self._known.get((op, tuple(x.id for x in args), index))
        if known is None:
            known = Node(self, op, args, index, len(self.nodes))
            self.nodes.append(known)
            self._known[(op, tuple(x.id for x in args), index)] = known
        return known


def _functions(graph: Graph) -> SimpleNamespace:
    return SimpleNamespace(**{name: (lambda name: lambda a: graph.make(name, a))(name) for name in FUNCTIONS},
                           maximum=lambda a, b: graph.make("maximum", a, b))


@dataclass(frozen=True)
class Step:
    """One cell's step: its gate blocks, state names (h first), per-unit parameters and equations."""

    gates: tuple[str, ...]
    states: tuple[str, ...]
    equations: Callable
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    recurrent_bias: bool = False

    def program(self) -> Program:
        return derive(self)

    def layout(self) -> tuple[int, tuple[str, ...], bool, dict[str, int]]:
        """What the engine and the model read of a cell: GATES (H-wide blocks of the
        pre-activations), STATE (names, h first), RECURRENT_BIAS (a separate b_hh, added to u),
        EXTRA (per-unit parameter -> its number of H-wide blocks)."""
        return len(self.gates), self.states, self.recurrent_bias, {k: len(v) for k, v in self.extra.items()}


@dataclass
class Program:
    """A step's forward and backward as node lists for the emitters.

    leaves: x/u/s/p/d nodes by block (x[k], u[k]: gate k's pre-activations; s[k]: old state k;
    p[k]: the k-th per-unit block over all parameters, in order; d[k]: the gradient of new state k,
    the output's own gradient included for h).
    outputs[k]: new state k. saved: what the forward keeps for the backward, in order.
    forward: the nodes the forward computes (outputs and saved among them), in order.
    d_x[k], d_u[k], d_s[k], d_p[k]: the gradients (None where zero); backward: the nodes they need,
    in order, where a forward node is read (a state, an output state, a parameter, a saved value)
    or recomputed (arithmetic).
    """

    step: Step
    x: list[Node]
    u: list[Node]
    s: list[Node]
    p: list[Node]
    d: list[Node]
    outputs: list[Node]
    saved: list[Node]
    forward: list[Node]
    d_x: list[Node | None]
    d_u: list[Node | None]
    d_s: list[Node | None]
    d_p: list[Node | None]
    backward: list[Node]

    @property
    def shared_gradient(self) -> bool:
        """Whether the two pre-activations get one gradient (they enter only as x_k + u_k)."""
        return all(a is b for a, b in zip(self.d_x, self.d_u))

    @property
    def extra_blocks(self) -> int:
        return len(self.p)


def derive(step: Step) -> Program:
    """Run the equations on symbols, differentiate them, and decide what the forward saves."""
    graph = Graph()
    x = [graph.leaf("x", k) for k in range(len(step.gates))]
    u = [graph.leaf("u", k) for k in range(len(step.gates))]
    s = [graph.leaf("s", k) for k in range(len(step.states))]
    block_names = [name for blocks in step.extra.values() for name in blocks]
    p = [graph.leaf("p", k) for k in range(len(block_names))]
    returned = step.equations(SimpleNamespace(**dict(zip(step.gates, x))), SimpleNamespace(**dict(zip(step.gates, u))),
                              SimpleNamespace(**dict(zip(step.states, s))), SimpleNamespace(**dict(zip(block_names, p))),
                              _functions(graph))
    if set(returned) != set(step.states):
        raise ValueError(f"the equations must return every state {step.states}, got {tuple(returned)}")
    outputs = [returned[name] if isinstance(returned[name], Node) else graph.const(returned[name]) for name in step.states]
    d = [graph.leaf("d", k) for k in range(len(step.states))]
    forward_nodes = reachable(outputs)
    adjoint = gradients(graph, forward_nodes, outputs, d)
    d_x, d_u, d_s, d_p = ([adjoint.get(id(n)) for n in leaves] for leaves in (x, u, s, p))
    results = [g for g in (*d_x, *d_u, *d_s, *d_p) if g is not None]
    saved, backward = backward_plan(results, outputs, s, p)
    forward = reachable([*outputs, *saved])
    return Program(step, x, u, s, p, d, outputs, saved, forward, d_x, d_u, d_s, d_p, backward)


BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def render(node: Node, name: Callable[[Node], str], calls: dict[str, str], split: str) -> str:
    """An operation node as an expression of an emitter's language (Python and C++ share the
    infix arithmetic): calls names each function, split is the template of the choice, over
    {a} and {b}; `name` gives an argument's name."""
    args = [name(a) for a in node.args]
    if node.op in BINARY:
        return f"{args[0]} {BINARY[node.op]} {args[1]}"
    if node.op == "neg":
        return f"-{args[0]}"
    if node.op == "split":
        return split.format(a=args[0], b=args[1])
    return f"{calls[node.op]}({', '.join(args)})"


def reachable(roots: list[Node]) -> list[Node]:
    """Every node the roots depend on, themselves included, in the graph's order."""
    seen: dict[int, Node] = {}
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node.id not in seen:
            seen[node.id] = node
            todo.extend(node.args)
    return [seen[k] for k in sorted(seen)]


def gradients(graph: Graph, forward: list[Node], outputs: list[Node], d: list[Node]) -> dict[int, Node]:
    """Reverse-mode differentiation: python id of a forward node -> the node of its gradient."""
    adjoint: dict[int, Node] = {}

    def add(node: Node, contribution: Node) -> None:
        if contribution.is_const(0.0):
            return
        known = adjoint.get(id(node))
        adjoint[id(node)] = contribution if known is None else known + contribution

    for out, grad in zip(outputs, d):
        add(out, grad)
    for node in reversed(forward):
        g = adjoint.get(id(node))
        if g is None or node.op in LEAVES:
            continue
        for arg, contribution in local_derivatives(graph, node, g):
            add(arg, contribution)
    return adjoint


def local_derivatives(graph: Graph, node: Node, g: Node) -> list[tuple[Node, Node]]:
    """(argument, g · ∂node/∂argument) for each argument of `node`, given g = ∂loss/∂node."""
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else None
    match node.op:
        case "add":
            return [(a, g), (b, g)]
        case "sub":
            return [(a, g), (b, -g)]
        case "neg":
            return [(a, -g)]
        case "mul":
            return [(a, g * b), (b, g * a)]
        case "div":  # ∂(a/b)/∂b = -(a/b)/b
            return [(a, g / b), (b, -(g * node) / b)]
        case "sigmoid":
            return [(a, g * (node * (1.0 - node)))]
        case "tanh":
            return [(a, g * (1.0 - node * node))]
        case "exp":
            return [(a, g * node)]
        case "log_sigmoid":  # d log σ(a) / da = σ(-a)
            return [(a, g * graph.make("sigmoid", -a))]
        case "maximum":
            to_a = graph.make("split", a, b)
            return [(a, g * to_a), (b, g - g * to_a)]
        case "split":
            return []
    raise ValueError(f"no derivative for {node.op}")


def backward_plan(results: list[Node], outputs: list[Node], s: list[Node], p: list[Node]) -> tuple[list[Node], list[Node]]:
    """What the forward saves, and the backward's nodes in order.

    A forward node the backward needs is read when it is a state, an output state or a parameter;
    saved when it is a function's value, a choice or a pre-activation; recomputed (its arguments
    resolved the same way) when it is arithmetic. Constants are written in place."""
    readable = {id(n) for n in (*s, *p, *outputs)}
    saved: dict[int, Node] = {}
    plan: dict[int, Node] = {}

    def visit(node: Node) -> None:
        if id(node) in plan or id(node) in saved:
            return
        if not node.grad and id(node) not in readable and node.op not in ("const",):
            if node.op in FUNCTIONS or node.op in CHOICES or node.op in ("x", "u"):
                saved[id(node)] = node
                return
        if node.grad or node.op in ARITHMETIC and id(node) not in readable:
            for arg in node.args:
                visit(arg)
        plan[id(node)] = node

    for result in results:
        visit(result)
    order = sorted(plan.values(), key=lambda n: n.id)
    return sorted(saved.values(), key=lambda n: n.id), order
