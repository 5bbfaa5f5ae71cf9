//! The client end of one connection to a worker: what balie-sfu (and the
//! tests) use. Connect, exchange hellos, then send control messages and
//! source groups, and receive the worker's control messages and layer
//! frames as [`LinkEvent`]s on one channel.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::io::{read_control, read_media, write_control, write_media, ReadError};
use crate::wire::{Control, ErrorCode, Frame, GroupHeader, Media, VERSION};

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the worker did not say hello within {0:?}")]
    NoHello(Duration),
    #[error("the worker's first message was not a hello: {0}")]
    NotHello(String),
    #[error("the worker speaks protocol version {0}, we speak {VERSION}")]
    Version(u16),
    #[error("reading the worker's hello: {0}")]
    Read(#[from] ReadError),
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
}

/// What the worker said or sent.
#[derive(Debug)]
pub enum LinkEvent {
    /// A control message (capacity, layout, keyframe, ended, error).
    Control(Control),
    /// A frame of a layer.
    Frame { header: GroupHeader, frame: Frame },
    /// A media stream from the worker was malformed (counted by the caller;
    /// the stream was stopped).
    BadStream(String),
    /// The connection is gone (lost, closed, or a protocol error).
    Closed(String),
}

/// A connected worker.
pub struct Link {
    pub conn: quinn::Connection,
    /// The worker's hello: agent, session limit, caption session limit
    /// (0: it makes no captions).
    pub agent: String,
    pub max_sessions: u32,
    pub max_captions: u32,
    ctl: mpsc::UnboundedSender<Control>,
}

/// How long a worker gets to answer a connection with its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

impl Link {
    /// Whether the worker ended the connection on purpose (a close frame
    /// with [`ErrorCode::Closed`]: it was stopped), rather than being lost
    /// (silent, or an error).
    pub fn stopped_by_peer(&self) -> bool {
        matches!(
            self.conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(a))
                if a.error_code == quinn::VarInt::from(ErrorCode::Closed as u32)
        )
    }

    /// Connect to a worker at `addr`, whose certificate must name
    /// `server_name`, and exchange hellos. Events arrive on the returned
    /// receiver until the connection ends (the last is `Closed`).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        agent: &str,
    ) -> Result<(Link, mpsc::UnboundedReceiver<LinkEvent>), LinkError> {
        let conn = endpoint.connect(addr, server_name)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_control(
            &mut send,
            &Control::Hello {
                version: VERSION,
                agent: agent.to_owned(),
                max_sessions: 0,
                max_captions: 0,
            },
        )
        .await?;
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv))
            .await
            .map_err(|_| LinkError::NoHello(HELLO_TIMEOUT))??;
        let (agent, max_sessions, max_captions) = match hello {
            Some(Control::Hello {
                version,
                agent,
                max_sessions,
                max_captions,
            }) => {
                if version != VERSION {
                    conn.close((ErrorCode::Version as u32).into(), b"version");
                    return Err(LinkError::Version(version));
                }
                (agent, max_sessions, max_captions)
            }
            other => return Err(LinkError::NotHello(format!("{other:?}"))),
        };
        let (ctl, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
        let (events, rx) = mpsc::unbounded_channel();
        // Control writer.
        tokio::spawn(async move {
            while let Some(msg) = ctl_rx.recv().await {
                if write_control(&mut send, &msg).await.is_err() {
                    break;
                }
            }
        });
        // Control reader.
        let ev = events.clone();
        let c = conn.clone();
        tokio::spawn(async move {
            loop {
                match read_control(&mut recv).await {
                    Ok(Some(msg)) => {
                        if ev.send(LinkEvent::Control(msg)).is_err() {
                            break;
                        }
                    }
                    Ok(None) => {
                        let _ = ev.send(LinkEvent::Closed("control stream ended".into()));
                        c.close((ErrorCode::Closed as u32).into(), b"control stream ended");
                        break;
                    }
                    Err(ReadError::Wire(e)) => {
                        c.close((e.code() as u32).into(), e.to_string().as_bytes());
                        let _ = ev.send(LinkEvent::Closed(format!("protocol error: {e}")));
                        break;
                    }
                    Err(e) => {
                        // Why the connection ended says more than the
                        // stream's error ("connection lost").
                        let why = c
                            .close_reason()
                            .map_or_else(|| e.to_string(), |r| r.to_string());
                        let _ = ev.send(LinkEvent::Closed(why));
                        break;
                    }
                }
            }
        });
        // Layer groups.
        let c = conn.clone();
        tokio::spawn(async move {
            while let Ok(recv) = c.accept_uni().await {
                tokio::spawn(read_group(recv, events.clone()));
            }
        });
        Ok((
            Link {
                conn,
                agent,
                max_sessions,
                max_captions,
                ctl,
            },
            rx,
        ))
    }

    /// Queue a control message; false when the link is gone.
    pub fn send(&self, msg: Control) -> bool {
        self.ctl.send(msg).is_ok()
    }

    /// Start a group of the source (`track` 0) for a session.
    pub async fn open_group(&self, header: GroupHeader) -> Result<GroupSender, LinkError> {
        GroupSender::open(&self.conn, header).await
    }

    /// The connection's smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }
}

/// One group (GOP) being written on its own stream.
pub struct GroupSender {
    send: quinn::SendStream,
}

impl GroupSender {
    /// Open a stream on `conn` and write the group's header.
    pub async fn open(conn: &quinn::Connection, header: GroupHeader) -> Result<Self, LinkError> {
        let mut send = conn.open_uni().await?;
        write_media(&mut send, &Media::Group(header)).await?;
        Ok(GroupSender { send })
    }

    pub async fn frame(&mut self, frame: Frame) -> Result<(), quinn::WriteError> {
        write_media(&mut self.send, &Media::Frame(frame)).await
    }

    /// The stream (to see whether the worker stopped it).
    pub fn stream(&mut self) -> &mut quinn::SendStream {
        &mut self.send
    }

    /// The group is complete.
    pub fn finish(mut self) {
        let _ = self.send.finish();
    }

    /// Drop the group's unsent data (stale).
    pub fn reset(mut self) {
        let _ = self.send.reset((ErrorCode::Closed as u32).into());
    }
}

async fn read_group(mut recv: quinn::RecvStream, events: mpsc::UnboundedSender<LinkEvent>) {
    let header = match read_media(&mut recv).await {
        Ok(Some(Media::Group(h))) => h,
        Ok(None) | Err(ReadError::Stream(_)) => return,
        Ok(Some(Media::Frame(_))) => {
            let _ = recv.stop((ErrorCode::Unexpected as u32).into());
            let _ = events.send(LinkEvent::BadStream("frame before group header".into()));
            return;
        }
        Err(e) => {
            let _ = recv.stop((ErrorCode::Malformed as u32).into());
            let _ = events.send(LinkEvent::BadStream(e.to_string()));
            return;
        }
    };
    loop {
        match read_media(&mut recv).await {
            Ok(Some(Media::Frame(frame))) => {
                if events.send(LinkEvent::Frame { header, frame }).is_err() {
                    return;
                }
            }
            Ok(None) | Err(ReadError::Stream(_)) => return,
            Ok(Some(Media::Group(_))) => {
                let _ = recv.stop((ErrorCode::Unexpected as u32).into());
                let _ = events.send(LinkEvent::BadStream("second group header".into()));
                return;
            }
            Err(e) => {
                let _ = recv.stop((ErrorCode::Malformed as u32).into());
                let _ = events.send(LinkEvent::BadStream(e.to_string()));
                return;
            }
        }
    }
}

/// A client endpoint on an ephemeral port of the family of `like`.
pub fn client_endpoint(
    config: quinn::ClientConfig,
    like: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    // A worker on loopback is dialled from loopback; others from any address.
    let ip: std::net::IpAddr = match like {
        a if a.ip().is_loopback() => a.ip(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
    };
    let bind = SocketAddr::new(ip, 0);
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(config);
    Ok(ep)
}
