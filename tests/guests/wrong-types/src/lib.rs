//! `wrong-types`: a real component that exports `init` and `handle` like procd's world, but with other
//! types, so only a type check of the exports (not a check of their names) refuses it.

// The generated bindings and their export glue are `unsafe` canonical-ABI code.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    inline: r"
        package test:wrong@0.1.0;

        world lookalike {
            export init: func(config: string) -> bool;
            export handle: func(event: string) -> string;
        }
    ",
    world: "lookalike",
});

struct Lookalike;

impl Guest for Lookalike {
    fn init(config: String) -> bool {
        config.is_empty()
    }

    fn handle(event: String) -> String {
        event
    }
}

export!(Lookalike);
