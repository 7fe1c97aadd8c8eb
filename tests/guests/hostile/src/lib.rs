//! `hostile`: a handler that misbehaves on purpose, for the fault-isolation tests.
//!
//! Every event is passed through to output 0 unless it is a *trigger*: an event whose value is exactly
//! the `on` config text (every event when `on` is not given). On a trigger it does what `mode` says:
//!
//! - `loop`: spins forever (the host's per-batch deadline must stop it);
//! - `memory`: allocates 16 MiB blocks toward 4 GiB (the memory limit must stop it);
//! - `recursion`: recurses without end (the stack limit must stop it);
//! - `panic`: panics (a trap);
//! - `flood`: emits a million records (the output limit must stop it);
//! - `logspam`: logs 10 000 lines, then passes the event through (the log rate limit must absorb it);
//! - `slow`: spins `spin` iterations (default 20 000 000), then passes the event through.
//!
//! With `values_in_init` set (to anything), `init` calls the `input.values` import itself, outside any
//! batch: the host must trap rather than hand out some batch's values.

use std::hint::black_box;

use procd_sdk::{Config, Context, Event, Handler, Result};

/// What a trigger event makes the handler do.
#[derive(Default, Clone, Copy)]
enum Mode {
    #[default]
    Loop,
    Memory,
    Recursion,
    Panic,
    Flood,
    LogSpam,
    Slow,
}

/// The misbehaving handler.
#[derive(Default)]
pub struct Hostile {
    mode: Mode,
    on: Option<Vec<u8>>,
    spin: u64,
}

impl Handler for Hostile {
    fn init(&mut self, config: &Config) -> Result {
        self.mode = match config.require("mode")? {
            "loop" => Mode::Loop,
            "memory" => Mode::Memory,
            "recursion" => Mode::Recursion,
            "panic" => Mode::Panic,
            "flood" => Mode::Flood,
            "logspam" => Mode::LogSpam,
            "slow" => Mode::Slow,
            other => procd_sdk::bail!("unknown mode {other:?}"),
        };
        self.on = config.get("on").map(|v| v.as_bytes().to_vec());
        self.spin = config.parse("spin")?.unwrap_or(20_000_000);
        if config.get("values_in_init").is_some() {
            values_outside_a_batch();
        }
        Ok(())
    }

    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let trigger = self.on.as_deref().is_none_or(|on| on == event.value());
        if trigger {
            match self.mode {
                Mode::Loop => {
                    let mut n = 0u64;
                    loop {
                        n = black_box(n.wrapping_add(1));
                    }
                }
                Mode::Memory => {
                    let mut blocks: Vec<Vec<u8>> = Vec::new();
                    for _ in 0..256 {
                        blocks.push(vec![1u8; 16 << 20]);
                    }
                    black_box(&blocks);
                }
                Mode::Recursion => {
                    black_box(recurse(black_box(1)));
                }
                Mode::Panic => panic!("hostile panic on offset {}", event.offset()),
                Mode::Flood => {
                    for i in 0..1_000_000u32 {
                        ctx.emit(0, event.key(), i.to_le_bytes());
                    }
                    return Ok(());
                }
                Mode::LogSpam => {
                    for i in 0..10_000 {
                        procd_sdk::info!("spam line {i} for offset {}", event.offset());
                    }
                }
                Mode::Slow => {
                    let mut n = 0u64;
                    for i in 0..self.spin {
                        n = black_box(n.wrapping_add(i));
                    }
                }
            }
        }
        ctx.emit(0, event.key(), event.value());
        Ok(())
    }
}

/// Calls `input.values` directly (the SDK only calls it while handling a batch).
fn values_outside_a_batch() {
    #[cfg(target_arch = "wasm32")]
    black_box(procd_sdk::__private::bindings::procd::handler::input::values());
}

/// Recursion the compiler cannot turn into a loop; it never returns, on purpose.
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let mut frame = [n; 64];
    black_box(&mut frame);
    recurse(black_box(n + 1)).wrapping_add(frame[black_box(3)])
}

procd_sdk::export!(Hostile);
