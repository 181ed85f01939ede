"""Adversarial terms for few-step students: a light discriminator head on DiT block features, and the GAN losses.

DMD2 (Yin et al. 2024) puts one such head on its fake score's middle block at noised inputs; ADD / LADD (Sauer et al.
2023, 2024) put one per feature level on the frozen teacher.
"""
import torch.nn as nn
import torch.nn.functional as F


class FeatureHead(nn.Module):
    """A realism logit per image from one block's tokens (N, T, D): LayerNorm, a per-token MLP, the mean over tokens.

    The block's tokens already carry the timestep and class through adaLN, so the head needs no conditioning of its
    own. The last layer starts at zero: every logit is 0 (chance) until the head is trained.
    """

    def __init__(self, hidden_size):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, tokens):
        return self.net(tokens.float()).squeeze(-1).mean(1)  # (N, T, D) -> (N, T) -> (N,)


# The non-saturating GAN losses (Goodfellow et al. 2014, Sec. 3) in softplus form, as DMD2 writes them:
# the generator minimises softplus(-D(fake)) = -log sigmoid(D(fake)); the discriminator softplus(D(fake)) +
# softplus(-D(real)). Per example, (N,).
def generator_gan_loss(fake_logits):
    return F.softplus(-fake_logits)


def discriminator_gan_loss(real_logits, fake_logits):
    return F.softplus(fake_logits) + F.softplus(-real_logits)


# The hinge losses (Lim & Ye 2017; ADD, Sauer et al. 2023, Eq. 2 and 3): the generator -D(fake), the discriminator
# relu(1 - D(real)) + relu(1 + D(fake)). Per example, (N,).
def generator_hinge_loss(fake_logits):
    return -fake_logits


def discriminator_hinge_loss(real_logits, fake_logits):
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)
