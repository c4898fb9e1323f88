import torch
from functools import partial
from torch import nn
from tinytune import (
    AdapterLayer, AdapterWrapper, IA3Config, LinearIA3Layer, LinearLoraLayer, LoraConfig,
)

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 300)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(300, 1)

    def forward(self, X):
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        return X

def get_data():
    torch.manual_seed(0)
    X = torch.randn(128, 10)
    return X, (X ** 2).sum(1, keepdim=True)

def train(model, X, y, steps=30):
    params = [p for p in model.parameters() if p.requires_grad]  # adapters only
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()

X, y = get_data()
