//! The CPU buffer pool (`engine::host_pool`): a PGD step after the first takes its tensor
//! buffers and its convolutions' scratch space from the pool. One test function, so no other
//! test in this binary moves the pool's statistics beside it (the poisoning of reused buffers
//! is a unit test in `host_pool`).

use robust_dml::engine::host_pool;
use robust_dml::engine::ops::reduce::sum;
use robust_dml::engine::testing::uniform;
use robust_dml::engine::{Device, Rng, Tensor};
use robust_dml::nn::{Backbone, EmbeddingNet, ForwardMode};

/// One PGD step's input gradient on c2f2 (eval mode, a frozen view: no parameter gradients).
fn input_gradient(net: &EmbeddingNet, x: &Tensor) -> Vec<f32> {
    let var = x.var();
    let loss = sum(&net.forward(&var, ForwardMode::Eval).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    grads.get(&var).unwrap().to_vec().unwrap()
}

#[test]
fn pgd_steps_after_the_first_take_every_buffer_from_the_pool() {
    let dev = Device::Cpu;
    let backbone = Backbone::C2f2 {
        input_size: (28, 28),
    };
    let net = EmbeddingNet::new(backbone, 16, &dev, &mut Rng::new(3)).unwrap();
    let frozen = net.frozen_view(&dev).unwrap();
    // The Fashion-MNIST protocol's batch: its buffers must all fit in the pool.
    let x = uniform(&[128, 3, 28, 28], 0.0, 1.0, 4);
    let first = input_gradient(&frozen, &x);
    let before = host_pool::stats();
    let second = input_gradient(&frozen, &x);
    let after = host_pool::stats();
    assert_eq!(first, second, "a reused buffer changed the gradient");
    assert!(first.iter().all(|g| g.is_finite()));
    let (reused, allocated) = (
        after.reused - before.reused,
        after.allocated - before.allocated,
    );
    let storages = after.storages - before.storages;
    assert!(reused > 0, "the second step reused nothing");
    assert_eq!(
        allocated, 0,
        "the second step allocated {allocated} buffers"
    );
    let scratch = after.scratch_allocated - before.scratch_allocated;
    assert_eq!(scratch, 0, "the second step made {scratch} scratch vectors");
    assert!(after.scratch_reused > before.scratch_reused);
    // The one storage not from the pool: the loss, a one-element sum.
    assert!(
        storages <= reused + 1,
        "{storages} storages made, only {reused} from the pool"
    );
}
