//! Feeds arbitrary bytes through both request decoders the way a client's
//! bytes reach them: the agent's length-delimited codec followed by the
//! JSON decoder (what `server.rs` does), and the blocking `read_frame`.
//! Any panic, hang or overlong allocation is a finding.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use token_agent_proto::{decode, read_frame, Request, MAX_REQUEST_LEN};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fuzz_target!(|data: &[u8]| {
    // The agent's side: frames until the codec wants more bytes or fails.
    let mut codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_REQUEST_LEN)
        .new_codec();
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buffer) {
        let _ = decode::<Request>(&frame);
    }
    let _ = codec.decode_eof(&mut buffer);

    // The blocking side, as simple clients read.
    let mut reader = data;
    while read_frame::<_, Request>(&mut reader, MAX_REQUEST_LEN).is_ok() {}

    // The body decoder on its own, for inputs that are bodies already.
    let _ = decode::<Request>(data);
});
