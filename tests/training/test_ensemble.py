"""Tower ensembles (model.towers): one inner product over concatenated vectors, each tower trained on its own."""

import numpy as np
import torch

from seqrank.training.artifact import load_artifact
from seqrank.training.batches import causal_train_batches
from seqrank.training.config import load_config
from seqrank.training.export import export_run
from seqrank.training.model import EncoderConfig, EncoderEnsemble, encode_histories, load_encoder
from seqrank.training.sources import load_sequences
from seqrank.training.step import batch_loss
from seqrank.training.train import fit


def test_ensemble_score_is_the_sum_of_its_towers_scores():
    torch.manual_seed(0)
    model = EncoderEnsemble(EncoderConfig(num_items=30, max_len=8, towers=("gpt2", "llama"))).eval()
    histories = [np.array([1, 2, 3]), np.array([4])]
    users = torch.from_numpy(encode_histories(model, histories))
    total = sum(
        torch.from_numpy(encode_histories(tower, histories)) @ tower.output_item_vectors().T for tower in model.towers
    )
    torch.testing.assert_close(users @ model.output_item_vectors().T, total)


def test_each_tower_gets_only_its_own_loss_gradient():
    config = load_config(None, ["model.towers=[gpt2, gpt2]", "data.synthetic_users=200", "data.synthetic_items=60"])
    data = load_sequences(config.data)
    torch.manual_seed(0)
    model = EncoderEnsemble(
        EncoderConfig(num_items=data.num_items, num_behaviors=data.num_behaviors, towers=("gpt2", "gpt2"))
    )
    batch = next(iter(causal_train_batches(data, model.config, 32, np.random.default_rng(0))))
    model.eval()  # no dropout: the ensemble loss must equal the towers' losses computed one by one
    joint = batch_loss(model, batch, config, None)
    separate = [batch_loss(tower, batch, config, None) for tower in model.towers]
    torch.testing.assert_close(joint, sum(separate))
    separate[0].backward()
    assert all(p.grad is None for p in model.towers[1].parameters())


def test_ensemble_trains_exports_and_serves_the_same_vectors(tmp_path):
    config = load_config(None, ["model.towers=[gpt2, llama]", "optim.max_epochs=2", "data.synthetic_users=300",
                                "data.synthetic_items=80"])
    fit(config, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "artifact")
    artifact = load_artifact(tmp_path / "artifact")
    served = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
    assert isinstance(served, EncoderEnsemble)
    assert artifact.item_vectors.shape[1] == 2 * config.model.hidden_size
    vectors = served.output_item_vectors()[: served.config.num_items + 1].detach().numpy()
    np.testing.assert_allclose(artifact.item_vectors[1:], vectors[1:], rtol=1e-6)


def test_separately_trained_runs_evaluate_as_one_ensemble(tmp_path, tiny_run, synthetic_dataset, capsys):
    import json

    from seqrank.serving.cli import main
    from seqrank.training.model import load_encoder_dir
    from tests.conftest import TINY_OVERRIDES

    events, attributes = synthetic_dataset
    config = load_config(None, TINY_OVERRIDES + [f"data.path={events}", f"data.attributes={attributes}",
                                                 "model.backbone=llama", "optim.max_epochs=3"])
    fit(config, tmp_path / "llama", progress=False)
    first, second = load_encoder_dir(tiny_run), load_encoder_dir(tmp_path / "llama")
    ensemble = EncoderEnsemble.of([first, second])
    histories = [np.array([3, 4, 5])]
    expected = sum(torch.from_numpy(encode_histories(m, histories)) @ m.output_item_vectors().T for m in (first, second))
    torch.testing.assert_close(torch.from_numpy(encode_histories(ensemble, histories)) @ ensemble.output_item_vectors().T,
                               expected)
    assert main(["evaluate", "--run", str(tiny_run), "--with", str(tmp_path / "llama"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 < report["NDCG@10"] <= 1.0
