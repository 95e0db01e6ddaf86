"""Baselines as their authors run them: LEM, coRNN, and the LSTM/GRU gate-bias initialisations.

LEM and coRNN are backbones like `TorchRNN` (hrnn/models/recurrent.py): forward(x, last_only=False)
maps x (B, T, I) to the states (B, T, H) the head reads, or with last_only=True to the last one
(B, H); `SequenceModel` adds the linear head. Both read out their y state, as the authors' models do.

Sources (the authors' code, read at these commits):
  LEM   github.com/tk-rusch/LEM   833da6b338a12c976e45db9061d6bcdccbfa4a5c  src/<task>/network.py, <task>_task.py
  coRNN github.com/tk-rusch/coRNN afd81744d108a2d623761b635b4ba56770d9e05d  <task>/network.py (adding/model.py), <task>_task.py

Parameter counts with hrnn's head (input 1, output 10, sMNIST):
  LEM-128 68,362 (the paper's "about 68k"; LSTM-128 is also exactly 68,362: both are 4H(I+H) + 8H + head)
  coRNN-128 34,314; coRNN-182 68,442 (equal parameters to LEM-128); coRNN-256 134,154 (the authors' sMNIST size)

The authors' settings per task, from the argparse defaults of their task scripts (the presets
conf/experiment/<task>_lem.yaml and <task>_cornn.yaml hold them;
each script uses Adam, and divides the learning rate by 10 after epoch 100 on (p)sMNIST):

  | model | task    | hidden | lr     | dt     | gamma | eps | batch | length      | grad clip (norm) | seed  | logged result        |
  |-------|---------|--------|--------|--------|-------|-----|-------|-------------|------------------|-------|----------------------|
  | LEM   | sMNIST  | 128    | 0.0018 | 0.21   | -     | -   | 128   | 120 epochs  | 1.0              | 5544  | test 99.45           |
  | LEM   | psMNIST | 128    | 0.0073 | 0.31   | -     | -   | 128   | 120 epochs  | 1.1              | 5544  | test 96.62           |
  | LEM   | adding  | 128    | 0.0026 | 0.0242 | -     | -   | 50    | 30000 steps | none             | none  | T=10000: MSE 2.4e-5  |
  | coRNN | sMNIST  | 256    | 0.0021 | 0.042  | 2.7   | 4.7 | 120   | 120 epochs  | none             | 46159 | test 99.35           |
  | coRNN | psMNIST | 256    | 0.0054 | 0.076  | 0.4   | 8.0 | 120   | 120 epochs  | none             | 12008 | test 97.34           |
  | coRNN | adding  | 128    | 0.02   | 0.06   | 66    | 15  | 50    | 60000 steps | none             | none  | (no log in the repo) |

Notes on that table. LEM's adding defaults are for T = 10000 (the script's default seq_length); the repo
logs T = 2000, 5000 and 10000 but says nothing of a different dt for the shorter ones. coRNN's adding
script defaults to T = 100 while the paper reports T = 500, 2000, 5000: treat its values as a starting
point, not as the paper's per-T choice. The psMNIST permutation is torch.randperm(784) right after
torch.manual_seed(seed): 5544 for LEM (as expRNN and others), 12008 for coRNN. Both split MNIST's
training set 57000/3000 (random_split) and report the test accuracy at the best validation epoch
(coRNN's sMNIST script: the last epoch's). LEM's class default is dt = 1, but every task script
overrides it (above). The MNIST pixels are torchvision's ToTensor values in [0, 1], not normalised.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hrnn.models.recurrent import Backbone

class LEM(Backbone):
    """Long Expressive Memory (Rusch, Mishra, Erichson & Mahoney, ICLR 2022), eq. (3) of the paper:

        dt_n    = dt * sigmoid(W_2 y_{n-1} + V_2 u_n + b_2)          (z's step)
        dtbar_n = dt * sigmoid(W_1 y_{n-1} + V_1 u_n + b_1)          (y's step)
        z_n = (1 - dt_n) * z_{n-1} + dt_n * tanh(W_z y_{n-1} + V_z u_n + b_z)
        y_n = (1 - dtbar_n) * y_{n-1} + dtbar_n * tanh(W_y z_n + V_y u_n + b_y)

    laid out as the authors' LEMCell: inp2hid (I -> 4H) gives [V_1; V_2; V_y; V_z] u (their chunks
    i_dt1, i_dt2, i_z, i_y: their "i_z" is the input term of y's update), hid2hid (H -> 3H) gives
    [W_1; W_2; W_z] y (h_dt1, h_dt2, h_y), transform_z (H -> H) gives W_y z. Each of the three Linear
    maps keeps its bias, as theirs do (so b_1, b_2, b_y, b_z are each a sum of two parameters).
    Initialisation as theirs: every weight and bias U(-1/sqrt(H), 1/sqrt(H)) (their reset_parameters,
    which replaces nn.Linear's default, whose input range would be 1/sqrt(I)). Their classifier's
    weight is kaiming_normal_; `authors_head_init` does that to hrnn's head. y_0 = z_0 = 0.
    """

    def __init__(self, input_size: int, hidden_size: int, dt: float = 1.0) -> None:
        super().__init__()
        self.hidden_size, self.dt = hidden_size, float(dt)
        self.inp2hid = nn.Linear(input_size, 4 * hidden_size)
        self.hid2hid = nn.Linear(hidden_size, 3 * hidden_size)
        self.transform_z = nn.Linear(hidden_size, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.uniform_(-bound, bound)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        batch, steps, _ = x.shape
        # Every step's input terms at once; unbind, not inputs[:, t]: indexing's backward would write each
        # step's gradient into a zero (B, T, 4H) tensor, T times over (O(T^2) work), unbind's stacks them once.
        inputs = self.inp2hid(x).unbind(1)
        y = x.new_zeros(batch, self.hidden_size)
        z = x.new_zeros(batch, self.hidden_size)
        states = []
        for t in range(steps):
            i_dt1, i_dt2, i_z, i_y = inputs[t].chunk(4, dim=1)
            h_dt1, h_dt2, h_y = self.hid2hid(y).chunk(3, dim=1)
            dt_bar = self.dt * torch.sigmoid(i_dt1 + h_dt1)
            dt_z = self.dt * torch.sigmoid(i_dt2 + h_dt2)
            z = (1.0 - dt_z) * z + dt_z * torch.tanh(i_y + h_y)
            y = (1.0 - dt_bar) * y + dt_bar * torch.tanh(self.transform_z(z) + i_z)
            if not last_only:
                states.append(y)
        return y if last_only else torch.stack(states, dim=1)

    def recurrence(self) -> str:
        return "pytorch loop"


class CoRNN(Backbone):
    """Coupled oscillatory RNN (Rusch & Mishra, ICLR 2021), eq. (3) of the paper (IMEX discretisation):

        z_n = z_{n-1} + dt * (tanh(W y_{n-1} + Wz z_{n-1} + V u_n + b) - gamma * y_{n-1} - epsilon * z_{n-1})
        y_n = y_{n-1} + dt * z_n

    laid out as the authors' coRNNCell: one nn.Linear `i2h` on cat(u_n, z_{n-1}, y_{n-1}) (I + 2H -> H),
    with nn.Linear's default initialisation (they change nothing). y_0 = z_0 = 0; the head reads y.
    The input columns are applied to every step at once; the recurrence multiplies cat(z, y) by the rest.
    dt, gamma and epsilon are fixed hyperparameters (the authors' values per task: the module docstring's table).
    """

    def __init__(self, input_size: int, hidden_size: int, dt: float, gamma: float, epsilon: float) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.dt, self.gamma, self.epsilon = float(dt), float(gamma), float(epsilon)
        self.i2h = nn.Linear(input_size + 2 * hidden_size, hidden_size)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        batch, steps, _ = x.shape
        weight_u = self.i2h.weight[:, :self.input_size]
        weight_zy = self.i2h.weight[:, self.input_size:].t()  # rows for cat(z, y), the authors' order
        inputs = torch.nn.functional.linear(x, weight_u, self.i2h.bias).unbind(1)  # T x (B, H): V u_n + b (see LEM)
        y = x.new_zeros(batch, self.hidden_size)
        z = x.new_zeros(batch, self.hidden_size)
        states = []
        for t in range(steps):
            drive = torch.tanh(inputs[t] + torch.cat((z, y), dim=1) @ weight_zy)
            z = z + self.dt * (drive - self.gamma * y - self.epsilon * z)
            y = y + self.dt * z
            if not last_only:
                states.append(y)
        return y if last_only else torch.stack(states, dim=1)

    def recurrence(self) -> str:
        return "pytorch loop"


def authors_head_init(head: nn.Linear) -> nn.Linear:
    """LEM's classifier: kaiming_normal_ weight (fan_in, gain sqrt(2)), bias left at nn.Linear's default."""
    nn.init.kaiming_normal_(head.weight)
    return head


# Gate-bias initialisation of torch.nn.LSTM / GRU. torch keeps two biases per gate, bias_ih and bias_hh,
# and adds them: the gate's effective bias is bias_ih + bias_hh. The functions below set the chosen
# gates' effective bias exactly, by writing the value into bias_ih and zeroing that gate's bias_hh
# (setting only one of them would leave the other's U(-1/sqrt(H), 1/sqrt(H)) default added to it;
# setting both to the value would double it). The gates they do not name keep their biases.
# torch's gate order along the 4H (LSTM) or 3H (GRU) rows: LSTM (i, f, g, o); GRU (r, z, n).

def _recurrent_layer(module: nn.Module) -> nn.Module:
    layer = getattr(module, "rnn", module)  # TorchRNN wraps its torch.nn layer as .rnn
    if not isinstance(layer, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)):
        raise TypeError(f"expected a torch.nn LSTM or GRU (or a TorchRNN around one), got {type(layer).__name__}")
    if not getattr(layer, "bias", True):
        raise ValueError("the layer was built with bias=False: there is no gate bias to set")
    return layer


def _bias_pairs(layer: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(bias_ih, bias_hh) of every layer and direction."""
    names = [name for name, _ in layer.named_parameters() if name.startswith("bias_ih")]
    return [(getattr(layer, name), getattr(layer, name.replace("bias_ih", "bias_hh"))) for name in names]


def _set_effective(bias_ih: Tensor, bias_hh: Tensor, rows: slice, value: Tensor | float) -> None:
    bias_ih[rows] = value
    bias_hh[rows] = 0.0


def chrono_init(lstm_or_gru: nn.Module, t_max: float, generator: torch.Generator | None = None) -> nn.Module:
    """Chrono initialisation (Tallec & Ollivier, ICLR 2018, "Can recurrent neural networks warp time?").

    LSTM: effective forget bias b_f = log(U[1, t_max - 1]), drawn per unit, and effective input bias
    b_i = -b_f; the cell and output gates keep their biases. Then at the start, with small inputs,
    sigmoid(b_f) = 1 - 1 / (1 + tau) for tau ~ U[1, t_max - 1]: each unit forgets on its own time
    scale, between 2 and t_max steps.

    GRU: no separate input gate, and torch's update gate z keeps the old state
    (h' = (1 - z) * n + z * h), so z is the forget gate's analogue: its effective bias is
    log(U[1, t_max - 1]) (the same time scales), and 1 - z, the GRU's input gate, gets
    sigmoid(-b_z) automatically, the analogue of b_i = -b_f. The reset gate r and the candidate n keep
    their biases. (For a GRU written with z weighting the new candidate, h' = (1 - z) h + z n, the same
    time scales are b_z = -log(U[1, t_max - 1]).)

    t_max is the longest dependency expected (e.g. the sequence length); it must exceed 2.
    Every layer and direction gets its own draw. Returns the module, modified in place.
    """
    if not t_max > 2:
        raise ValueError(f"t_max={t_max} must be greater than 2: the time scales are drawn from U[1, t_max - 1]")
    layer = _recurrent_layer(lstm_or_gru)
    hidden = layer.hidden_size
    is_lstm = isinstance(layer, (nn.LSTM, nn.LSTMCell))
    with torch.no_grad():
        for bias_ih, bias_hh in _bias_pairs(layer):
            tau = torch.empty(hidden, dtype=torch.float64).uniform_(1.0, t_max - 1.0, generator=generator)
            keep = torch.log(tau).to(bias_ih)
            if is_lstm:
                _set_effective(bias_ih, bias_hh, slice(hidden, 2 * hidden), keep)  # forget gate f
                _set_effective(bias_ih, bias_hh, slice(0, hidden), -keep)  # input gate i
            else:
                _set_effective(bias_ih, bias_hh, slice(hidden, 2 * hidden), keep)  # update gate z
    return lstm_or_gru


def forget_bias_init(lstm: nn.Module, value: float = 1.0) -> nn.Module:
    """The LSTM forget gate's effective bias (bias_ih + bias_hh) = value in every unit, layer and
    direction (1: Gers, Schmidhuber & Cummins 2000; Jozefowicz, Zaremba & Sutskever 2015); the other
    gates keep their biases. Returns the module, modified in place."""
    layer = _recurrent_layer(lstm)
    if not isinstance(layer, (nn.LSTM, nn.LSTMCell)):
        raise TypeError(f"forget_bias_init takes an LSTM, got {type(layer).__name__}; a GRU's analogue is chrono_init")
    hidden = layer.hidden_size
    with torch.no_grad():
        for bias_ih, bias_hh in _bias_pairs(layer):
            _set_effective(bias_ih, bias_hh, slice(hidden, 2 * hidden), float(value))
    return lstm


def effective_bias(layer: nn.Module) -> list[Tensor]:
    """bias_ih + bias_hh of every layer and direction of a torch.nn LSTM/GRU (or a TorchRNN): what the gates see."""
    return [(bias_ih + bias_hh).detach() for bias_ih, bias_hh in _bias_pairs(_recurrent_layer(layer))]


__all__ = ["LEM", "CoRNN", "authors_head_init", "chrono_init",
           "forget_bias_init", "effective_bias"]
